"""Checks of the user's input that need no torch, so that bad input fails fast: the ``--model``
value, the prompts, the output path.

What a ``--model`` value names:

    gpt2, org/name        a Hugging Face hub id (``gpt2-small`` is an alias of ``gpt2``)
    ./dir, /abs/dir       a local folder written by ``save_pretrained``
    model.gguf            a local GGUF file
    hexray-demo           the small model shipped inside HexRay (hexray_core/models/hexray-demo/)
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
import struct
import uuid
import zipfile

from hexray_core.errors import HexRayError

ALIASES = {"gpt2-small": "gpt2"}
DEMO_NAME = "hexray-demo"
ALTERNATIVES = ("try the embedded demo model (--model hexray-demo), which needs no network, or use a local model "
                "folder (--model ./my-model, written by save_pretrained) or a local .gguf file (--model model.gguf)")
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
    if source in ("local", "embedded"):
        check_weight_files(where, spec)
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
        try:
            p.encode("utf-8")
        except UnicodeEncodeError as e:  # a non-UTF-8 byte in argv arrives as a lone surrogate
            raise HexRayError(f"prompt {i + 1} is not valid UTF-8 text (an undecodable byte at character "
                              f"{e.start})") from None
    return prompts


def shown(text: str) -> str:
    """A path or value for a one-line message: control characters (a newline in a name) escaped."""
    return text if text.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


# -- numbers and devices -------------------------------------------------------------------------

SEED_RANGE = (-(1 << 63), (1 << 64) - 1)  # what torch.Generator.manual_seed takes


def check_generation(temperature, seed) -> None:
    """--temperature: a finite number >= 0; --seed: an integer that fits in 64 bits."""
    try:
        t = float(temperature)
    except (TypeError, ValueError):
        raise HexRayError(f"temperature= must be a number, not {temperature!r}") from None
    if not math.isfinite(t) or t < 0:
        raise HexRayError(f"temperature= must be a finite number, 0 (greedy) or more, not {temperature}")
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise HexRayError(f"seed= must be an integer, not {seed!r}")
        if not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
            raise HexRayError(f"seed= {seed} does not fit in 64 bits (use 0 to {SEED_RANGE[1]})")


_DEVICE = re.compile(r"auto|cpu|mps|xpu|meta|cuda(:\d+)?")


def check_device(device, n_devices) -> None:
    """--device: auto, cpu, cuda, cuda:N, mps (not empty); --n-devices: 1 or more."""
    if device is not None and (not isinstance(device, str) or not _DEVICE.fullmatch(device.strip())):
        raise HexRayError(f"device= {shown(str(device))!r}: expected auto, cpu, cuda, cuda:N or mps")
    if n_devices is not None and (isinstance(n_devices, bool) or not isinstance(n_devices, int) or n_devices < 1):
        raise HexRayError(f"n_devices= must be 1 or more, not {n_devices}")


# -- weight files --------------------------------------------------------------------------------

def check_weight_files(folder: str, spec: str) -> None:
    """Refuse a model folder whose weight files are cut short, before torch reads them.

    safetensors: the header (8-byte length, then JSON with each tensor's data offsets) must fit in
    the file, and so must the data it describes. PyTorch .bin files (zip archives since torch 1.6):
    the zip's central directory must be there (it is at the very end, so a truncation removes it).
    """
    try:
        names = sorted(os.listdir(folder))
    except OSError as e:
        raise HexRayError(f"--model {spec}: cannot list {shown(folder)} ({e.strerror or e})") from None
    for name in names:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        if name.endswith(".safetensors"):
            problem = _safetensors_problem(path)
        elif name.endswith(".bin") and name.startswith("pytorch_model"):
            problem = None if zipfile.is_zipfile(path) else "not a complete zip archive (truncated?)"
        else:
            continue
        if problem:
            raise HexRayError(f"--model {spec}: weights file {shown(name)} is damaged: {problem}")


def _safetensors_problem(path: str) -> str | None:
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"{size} bytes, shorter than a safetensors header"
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, 100 << 20):
                return f"its header claims {n:,} bytes but the file has {size:,} (truncated?)"
            header = json.loads(f.read(n))
    except (OSError, ValueError) as e:
        return f"unreadable safetensors header ({e})"
    if not isinstance(header, dict):
        return "the safetensors header is not a JSON object"
    end = 0
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(x) is int for x in offsets)):
            return f"tensor {key!r} has no valid data_offsets"
        end = max(end, offsets[1])
    if 8 + n + end > size:
        return f"its tensors need {8 + n + end:,} bytes but the file has {size:,} (truncated)"
    return None


def check_output_path(path: str) -> str:
    """Fail early (before loading a model) when ``path`` cannot be written: its folder is missing or
    not writable, or it exists and is not a regular file (``-o /dev/null`` run as root would replace
    the device node with a trace)."""
    path = os.path.expanduser(os.fspath(path))
    if not path:
        raise HexRayError("no output path given (-o trace.hxr)")
    try:
        mode = os.stat(path).st_mode
    except OSError:
        mode = None
    if mode is not None and stat.S_ISDIR(mode):
        raise HexRayError(f"cannot write {shown(path)}: it is a folder")
    if mode is not None and not stat.S_ISREG(mode):
        raise HexRayError(f"cannot write {shown(path)}: it exists and is not a regular file "
                          "(a device, FIFO or socket); give a new path or a regular file to replace")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise HexRayError(f"cannot write {shown(path)}: no such folder {shown(folder)}")
    probe = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.{uuid.uuid4().hex[:8]}.probe")
    try:
        with open(probe, "xb"):
            pass
        os.unlink(probe)
    except OSError as e:
        raise HexRayError(f"cannot write {shown(path)}: {e.strerror or e}") from None
    return path
