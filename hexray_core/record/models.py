"""Loading a model as a TransformerLens bridge in compatibility mode, and describing it.

``--model`` accepts:

    gpt2, org/name        a Hugging Face hub id (``gpt2-small`` is an alias of ``gpt2``)
    ./dir, /abs/dir       a local folder written by ``save_pretrained`` (config.json + weights + tokenizer)
    model.gguf            a local GGUF file (transformers' ``gguf_file`` loading; needs ``pip install gguf``)
    hexray-demo           the small model shipped inside HexRay (hexray_core/models/hexray-demo/)

``from_objects`` wraps what a caller already holds: a ``TransformerBridge``, or a Hugging Face
model plus its tokenizer (the language server's worker and the tests use it to avoid reloading).

Every bridge is put in TransformerLens compatibility mode with ``center_unembed=False``: LayerNorm
folded into the next layer, writing weights centred, value biases folded into ``b_O``. Its logits
then equal the Hugging Face model's, and the direct-logit-attribution identity is exact.
Compatibility mode rewrites the wrapped model's weights in place; a model handed to
``from_objects`` is changed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import warnings
from dataclasses import dataclass, field

import torch

from hexray_core import __version__
from hexray_core.errors import HexRayError
from hexray_core.kit.builder import raw_arrays

from .spec import ALIASES, ALTERNATIVES, precheck

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
PROCESSING = {"compatibility_mode": True, "fold_ln": True, "center_writing_weights": True,
              "center_unembed": False, "fold_value_biases": True}
@dataclass
class LoadedModel:
    """A bridge ready to record, with what a trace's metadata says about it."""

    bridge: object
    tokenizer: object
    model_meta: dict
    tokenizer_meta: dict
    device: str
    dtype: torch.dtype
    cache: dict = field(default_factory=dict)  # per-model memo (the kit and its sha256)

    @property
    def n_ctx(self) -> int:
        return int(self.bridge.cfg.n_ctx)

    @property
    def d_vocab(self) -> int:
        return int(self.bridge.cfg.d_vocab)

    @property
    def input_device(self) -> torch.device:
        try:
            return self.bridge.embed.W_E.device
        except Exception:
            return torch.device(self.device)


# -- resolving options -------------------------------------------------------------------------

def resolve_device(device: str | None) -> str:
    device = (device or "auto").strip()
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise HexRayError(f"--device {device}: CUDA is not available on this machine (use --device cpu)")
        if ":" in device:
            try:
                index = int(device.split(":", 1)[1])
            except ValueError:
                raise HexRayError(f"--device {device}: expected cuda or cuda:N") from None
            if not 0 <= index < torch.cuda.device_count():
                raise HexRayError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        return device
    if device == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise HexRayError("--device mps: MPS is not available on this machine")
        return device
    if device == "cpu":
        return device
    raise HexRayError(f"--device {device}: expected auto, cpu, cuda or cuda:N")


def resolve_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[(dtype or "float32").lower()]
    except KeyError:
        raise HexRayError(f"--dtype {dtype}: expected float32, float16 or bfloat16") from None


# -- loading -----------------------------------------------------------------------------------

def load_model(spec: str = "gpt2", *, device: str | None = "auto", dtype="float32", n_devices: int | None = None,
               device_map=None, trust_remote_code: bool = False, revision: str | None = None,
               progress=None) -> LoadedModel:
    """Load ``spec`` (hub id, folder, .gguf or hexray-demo) as a bridge in compatibility mode."""
    source, where = precheck(spec)
    torch_dtype = resolve_dtype(dtype)
    multi = (n_devices is not None and n_devices > 1) or device_map is not None
    dev = None if multi else resolve_device(device)
    if multi and not torch.cuda.is_available():
        raise HexRayError("--n-devices/--device-map need CUDA, which is not available on this machine")
    _say(progress, f"loading {spec} ({source}) on {dev or 'multiple devices'}")
    _quiet_libraries()
    if source == "gguf":
        hf, tok = _load_gguf(where, torch_dtype, dev, trust_remote_code)
        loaded = from_objects(hf, tok, name=spec, device=dev, _source="gguf", _path=where)
        return loaded
    from transformer_lens.model_bridge import TransformerBridge

    kwargs = dict(dtype=torch_dtype, trust_remote_code=trust_remote_code)
    if multi:
        kwargs.update(n_devices=n_devices, device_map=device_map)
    else:
        kwargs["device"] = dev
    if revision is not None:
        kwargs["revision"] = revision
    name = where if source in ("local", "embedded") else ALIASES.get(spec, spec)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            bridge = TransformerBridge.boot_transformers(name, **kwargs)
    except HexRayError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError, ImportError) as e:
        raise _load_error(spec, source, e) from None
    _say(progress, "processing weights (compatibility mode)")
    _enable_compat(bridge)
    hf_cfg = getattr(bridge.original_model, "config", None)
    rev = revision
    if source == "hub":
        rev = getattr(hf_cfg, "_commit_hash", None) or revision
    return _describe(bridge, bridge.tokenizer, name=spec, source=source, revision=rev,
                     path=where if source != "hub" else None, processing=dict(PROCESSING))


def _load_gguf(path: str, dtype: torch.dtype, device: str | None, trust_remote_code: bool):
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise HexRayError("reading .gguf files needs the gguf package: pip install gguf") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, fname = os.path.split(path)
    try:
        # transformers draws its own tqdm bar while dequantizing: keep stderr for HexRay's progress
        with warnings.catch_warnings(), open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull):
            warnings.simplefilter("ignore")
            tok = AutoTokenizer.from_pretrained(folder, gguf_file=fname, trust_remote_code=trust_remote_code)
            hf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=dtype,
                                                      trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, RuntimeError, NotImplementedError) as e:
        raise HexRayError(f"--model {path}: cannot load this .gguf file ({_first_line(e)})") from None
    hf = hf.to(device or "cpu").eval()
    return hf, tok


def _first_line(e: BaseException, limit: int = 200) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _load_error(spec: str, source: str, e: BaseException) -> HexRayError:
    msg = str(e)
    if "trust_remote_code" in msg:
        return HexRayError(f"model {spec!r} runs its own code from the model repository: "
                           "pass --trust-remote-code if you trust it")
    if source == "hub":
        offline = any(k in msg for k in ("couldn't connect", "offline", "Connection", "resolve", "not a valid model",
                                         "does not appear", "Repository Not Found", "not found"))
        why = "offline, or no such model id" if offline else _first_line(e)
        return HexRayError(f"cannot load model {spec!r} from the Hugging Face hub ({why}); {ALTERNATIVES}")
    return HexRayError(f"cannot load model {spec!r} ({_first_line(e)})")


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:
        pass
    try:
        from huggingface_hub.utils import logging as hub_logging

        hub_logging.set_verbosity_error()
    except Exception:
        pass


def _say(progress, message: str) -> None:
    if progress is not None:
        progress("status", message=message)


def _enable_compat(bridge) -> None:
    # Read what processing removes while the weights are still unprocessed: replay rebuilds the raw
    # (unfolded, uncentred) activation space that dictionaries were trained in from it.
    bridge._hexray_raw = raw_arrays(bridge)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bridge.enable_compatibility_mode(disable_warnings=True, center_unembed=False)
    bridge._hexray_processing = dict(PROCESSING)


def _ensure_tl_tokenizer(tok, name: str) -> None:
    """TransformerLens 4.3 needs ``name_or_path`` in an in-memory tokenizer's init kwargs, and reloads the
    tokenizer from that path unless ``add_bos_token`` is set. HexRay tokenizes prompts itself, so
    marking it is enough."""
    kw = getattr(tok, "init_kwargs", None)
    if isinstance(kw, dict):
        kw.setdefault("name_or_path", getattr(tok, "name_or_path", None) or name)
        if getattr(tok, "bos_token", None) is not None and not kw.get("add_bos_token"):
            kw["add_bos_token"] = True


def from_objects(model, tokenizer=None, *, name: str | None = None, device: str | None = None,
                 _source: str = "memory", _path: str | None = None) -> LoadedModel:
    """Wrap an already loaded ``TransformerBridge``, or a Hugging Face model and its tokenizer.

    A bridge not yet in compatibility mode, or a Hugging Face model, is switched to compatibility
    mode with ``center_unembed=False`` (this rewrites its weights in place).
    """
    from transformer_lens.model_bridge import TransformerBridge

    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, TransformerBridge):
        bridge = model
        tokenizer = tokenizer or bridge.tokenizer
        if tokenizer is None:
            raise HexRayError("the bridge has no tokenizer: pass tokenizer=...")
        if not getattr(bridge, "compatibility_mode", False):
            _enable_compat(bridge)
        processing = getattr(bridge, "_hexray_processing", None) or _detect_processing(bridge)
        label = name or getattr(bridge.cfg, "model_name", None) or "bridge"
        return _describe(bridge, tokenizer, name=label, source=_source, revision=None, path=_path,
                         processing=processing)
    if not isinstance(model, torch.nn.Module):
        raise HexRayError(f"model must be a name, a path, a TransformerBridge or a Hugging Face model, "
                          f"not {type(model).__name__}")
    if tokenizer is None:
        raise HexRayError("recording a Hugging Face model object needs its tokenizer: pass tokenizer=...")
    label = name or getattr(getattr(model, "config", None), "name_or_path", None) or type(model).__name__
    _ensure_tl_tokenizer(tokenizer, label)
    try:
        param = next(model.parameters())
        dev, dtype = str(param.device), param.dtype
    except StopIteration:
        dev, dtype = device or "cpu", torch.float32
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bridge = TransformerBridge.boot_transformers(label, hf_model=model.eval(), tokenizer=tokenizer,
                                                     device=device or dev, dtype=dtype)
    _enable_compat(bridge)
    return _describe(bridge, tokenizer, name=label, source=_source, revision=None, path=_path,
                     processing=dict(PROCESSING))


def _detect_processing(bridge) -> dict:
    """Processing flags of a bridge someone else put in compatibility mode (best effort)."""
    with torch.no_grad():
        w_u = bridge.W_U.float()
        centred = bool(w_u.mean(-1).abs().max() < 1e-4 * (w_u.abs().mean() + 1e-12))
        ln_f = getattr(bridge, "ln_final", None)
        w = getattr(ln_f, "w", None) if ln_f is not None else None
        folded = bool(w is None or torch.all(w == 1))
    return {"compatibility_mode": True, "fold_ln": folded, "center_writing_weights": folded,
            "center_unembed": centred, "fold_value_biases": folded,
            "detected": True}


def _config_meta(cfg) -> dict:
    def get(k, default=None):
        v = getattr(cfg, k, default)
        return v.item() if hasattr(v, "item") else v

    norm = get("normalization_type")
    return {
        "n_layers": int(get("n_layers")), "d_model": int(get("d_model")), "n_heads": int(get("n_heads")),
        "d_head": int(get("d_head")), "d_mlp": int(get("d_mlp") or 0), "d_vocab": int(get("d_vocab")),
        "n_ctx": int(get("n_ctx")), "act_fn": get("act_fn"), "normalization_type": norm,
        "positional_embedding_type": get("positional_embedding_type"), "gated_mlp": bool(get("gated_mlp", False)),
        "n_key_value_heads": int(get("n_key_value_heads") or get("n_heads")),
        "eps": float(get("eps", 1e-5)),  # the final norm's epsilon: the logit lens recomputes the norm
    }


def tokenizer_fingerprint(tok) -> str:
    """sha256 of the tokenizer's full definition (tokenizer.json for fast tokenizers)."""
    h = hashlib.sha256()
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode("utf-8"))
    else:
        h.update(json.dumps(sorted(tok.get_vocab().items()), ensure_ascii=False).encode("utf-8"))
    for attr in ("bos_token", "eos_token", "unk_token", "pad_token"):
        h.update(f"\0{attr}={getattr(tok, attr, None)}".encode())
    return h.hexdigest()


def device_description(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        index = int(device.split(":", 1)[1]) if ":" in device else torch.cuda.current_device()
        return f"{device} ({torch.cuda.get_device_name(index)})"
    return f"{device} ({platform.processor() or platform.machine()}, {os.cpu_count()} cpus)"


def _describe(bridge, tok, *, name: str, source: str, revision, path, processing) -> LoadedModel:
    hf = getattr(bridge, "original_model", None)
    hf_cfg = getattr(hf, "config", None)
    cls = type(hf).__name__ if hf is not None else type(bridge).__name__
    arch = ((getattr(hf_cfg, "architectures", None) or [cls])[0]) if hf_cfg is not None else cls
    param = next(iter(bridge.parameters()))
    dtype = param.dtype
    device = str(getattr(bridge.cfg, "device", None) or param.device)
    model_meta = {
        "name": name, "source": source, "revision": revision, "class": cls, "architecture": arch,
        "dtype": DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", "")),
        "config": _config_meta(bridge.cfg), "processing": processing,
    }
    blocks = getattr(bridge, "blocks", None)
    block = blocks[0] if blocks is not None and len(blocks) else None
    # Gemma 2/3, OLMo 2, ...: a norm after attention (and the MLP) sits between W_O and the residual stream
    model_meta["config"]["post_norms"] = bool(block is not None and (hasattr(block, "ln1_post")
                                                                        or hasattr(block, "ln2_post")))
    if path is not None:
        model_meta["path"] = path
    # The embedded model's tokenizer is named, not located: its folder is an install detail.
    tok_name = name if source == "embedded" else (getattr(tok, "name_or_path", None) or name)
    tok_meta = {"name": tok_name, "vocab_size": len(tok),
                "bos_token_id": getattr(tok, "bos_token_id", None), "sha256": tokenizer_fingerprint(tok),
                "class": type(tok).__name__}
    return LoadedModel(bridge=bridge, tokenizer=tok, model_meta=model_meta, tokenizer_meta=tok_meta,
                       device=device, dtype=dtype)


def writer_meta(device: str) -> dict:
    import numpy
    import transformers

    try:
        import transformer_lens

        tl_version = getattr(transformer_lens, "__version__", None)
    except Exception:
        tl_version = None
    if not tl_version:
        from importlib.metadata import version

        tl_version = version("transformer-lens")
    return {"hexray": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "transformer_lens": tl_version,
            "numpy": numpy.__version__, "device": device_description(device), "platform": platform.platform()}
