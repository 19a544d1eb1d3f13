"""Checks of the user's input that need no torch, so that bad input fails fast: the ``--model``
value, the prompts, the output path.

What a ``--model`` value names:

    gpt2, org/name        a Hugging Face hub id (``gpt2-small`` is an alias of ``gpt2``)
    ./dir, /abs/dir       a local folder written by ``save_pretrained``
    model.gguf            a local GGUF file
    hexray-demo           the small model shipped inside HexRay (hexray_core/models/hexray-demo/)
"""

from __future__ import annotations

import os
import re
import uuid

from hexray_core.errors import HexRayError

ALIASES = {"gpt2-small": "gpt2"}
DEMO_NAME = "hexray-demo"
ALTERNATIVES = ("use a local model folder (--model ./my-model, written by save_pretrained), "
                "a local .gguf file (--model model.gguf), or the embedded demo model (--model hexray-demo)")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def demo_model_dir() -> str:
    import hexray_core

    return os.path.join(os.path.dirname(os.path.abspath(hexray_core.__file__)), "models", DEMO_NAME)


def classify(spec: str) -> tuple[str, str]:
    """(source, location) for a --model value: ("hub", id) | ("local", dir) | ("gguf", file) | ("embedded", dir)."""
    if not isinstance(spec, str) or not spec.strip():
        raise HexRayError("--model is empty")
    spec = ALIASES.get(spec, spec)
    if spec == DEMO_NAME:
        return "embedded", demo_model_dir()
    path = os.path.expanduser(spec)
    if spec.lower().endswith(".gguf"):
        if not os.path.isfile(path):
            raise HexRayError(f"--model {spec}: no such .gguf file")
        return "gguf", os.path.abspath(path)
    if os.path.isdir(path):
        return "local", os.path.abspath(path)
    if os.path.exists(path):
        raise HexRayError(f"--model {spec}: not a model folder or .gguf file")
    if not _HUB_ID.match(spec):
        raise HexRayError(f"--model {spec}: no such model folder (and not a hub id like gpt2 or org/name)")
    return "hub", spec


def _offline() -> bool:
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _hub_reachable() -> bool:
    """Whether the hub's host name resolves (a cheap test for "this machine is offline")."""
    import socket
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
        return True
    except OSError:
        return False


def precheck(spec: str) -> tuple[str, str]:
    """``classify`` plus the checks that need no torch: the demo model is installed, a folder has a
    config.json, and a hub model is in the local cache when the hub is switched off (HF_HUB_OFFLINE)."""
    source, where = classify(spec)
    if source == "embedded" and not os.path.isfile(os.path.join(where, "config.json")):
        raise HexRayError(f"the embedded demo model is not installed (expected it in {where}); "
                          "build it with scripts/train_demo_model.py and scripts/package_demo_model.py, "
                          "or use --model with a hub id, a folder or a .gguf file")
    if source == "local" and not os.path.isfile(os.path.join(where, "config.json")):
        raise HexRayError(f"--model {spec}: {where} has no config.json (expected a save_pretrained folder)")
    if source == "local":
        check_tokenizer_files(spec, where)
    why = "the Hugging Face hub is switched off (HF_HUB_OFFLINE)"
    if source == "hub" and not _offline() and not _hub_reachable():
        # No network: say so at once instead of letting the hub client retry for half a minute.
        os.environ["HF_HUB_OFFLINE"] = "1"
        why = "this machine cannot reach the Hugging Face hub"
    if source == "hub" and _offline():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(where, "config.json")
        except Exception:
            cached = "unknown"
        if not isinstance(cached, str):
            raise HexRayError(f"cannot load model {spec!r}: {why} and the model is not in the local cache; "
                              f"{ALTERNATIVES}")
    return source, where


# Files any one of which gives a folder a tokenizer (fast tokenizer; SentencePiece; GPT-2-style BPE; WordPiece).
TOKENIZER_FILES = (("tokenizer.json",), ("tokenizer.model",), ("vocab.json", "merges.txt"), ("vocab.txt",))


def check_tokenizer_files(spec: str, folder: str) -> None:
    """A folder without tokenizer files would load with a one-token-per-prompt fallback: refuse it."""
    if any(all(os.path.isfile(os.path.join(folder, f)) for f in group) for group in TOKENIZER_FILES):
        return
    wanted = " or ".join(" + ".join(group) for group in TOKENIZER_FILES)
    raise HexRayError(f"--model {spec}: {folder} has no tokenizer files (expected {wanted}); save the tokenizer "
                      "there too: tokenizer.save_pretrained(folder)")


def human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def normalize_prompts(prompts) -> list[str]:
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise HexRayError("no prompts to record")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise HexRayError(f"prompt {i + 1} is a {type(p).__name__}, not text")
        if p == "":
            raise HexRayError("empty prompt: nothing to record" if len(prompts) == 1 else f"prompt {i + 1} is empty")
    return prompts


def check_output_path(path: str) -> str:
    """Fail early (before loading a model) when ``path`` cannot be written."""
    path = os.path.expanduser(os.fspath(path))
    if not path:
        raise HexRayError("no output path given (-o trace.hxr)")
    if os.path.isdir(path):
        raise HexRayError(f"cannot write {path}: it is a folder")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise HexRayError(f"cannot write {path}: no such folder {folder}")
    probe = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.{uuid.uuid4().hex[:8]}.probe")
    try:
        with open(probe, "xb"):
            pass
        os.unlink(probe)
    except OSError as e:
        raise HexRayError(f"cannot write {path}: {e.strerror or e}") from None
    return path
