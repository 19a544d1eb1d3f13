"""Typed settings of `hexray lsp`, with defaults.

The client sends them as ``initializationOptions`` (either the settings object itself or
``{"hexray": {...}}``), in ``workspace/didChangeConfiguration`` and, when it supports
``workspace/configuration``, on request (section ``hexray``). Keys are camelCase as in an editor's
settings file; nested objects and dotted keys (``"hover.predictions": 8``) are both accepted.

A value of the wrong type or out of range does not stop the server: that setting falls back to
its default and `parse` returns a message saying so, which the server shows once.

Settings (key, type and default, meaning):

    filePatterns            globs, ["*.prompt"]   documents served: a glob without "/" matches the file
                                                 name, one with "/" the path; documents with language
                                                 id hexray-prompt are always served
    inlayHints              "probability"         probability | surprisal | contributor | off
    surpriseThreshold       0 (off)               mark tokens given a probability below this (0..1)
    maxSurpriseDiagnostics  200                   at most this many surprising-token diagnostics
    recordOnSave            false                 record the trace again when the document is saved
    recordOnSaveDelayMs     200                   debounce: wait this long after the last save
    model                   "hexray-demo"         model the worker records with: a name, hub id or folder
    modelFactory            ""                    "package.module:function" returning an already built
                                                 model (a TransformerBridge, a (model, tokenizer) pair or
                                                 {"model", "tokenizer"}); overrides model. Tests use it
                                                 for tiny in-memory models
    device                  "cpu"                 torch device of the worker: cpu, cuda, cuda:1, mps, auto
    python                  ""                    the worker's interpreter (needs hexray + torch); empty:
                                                 the server's own
    extraPaths              []                    prepended to the worker's sys.path (modelFactory modules)
    workerNice              10                    the worker's CPU niceness (0-19): recording never
                                                 starves the server's answers
    workerThreads           0 (auto)              torch CPU threads in the worker; 0: half the cores
    recordOptions           {}                    extra keyword arguments for the recorder, e.g.
                                                 {"top_k": 20, "bundle": true, "act_dtype": "float32"}
    recordTo                "beside"              beside (name.hxr next to name.prompt) | cache (traceFolder)
    traceFolder             ".hexray/traces"      the workspace trace folder (relative to the workspace
                                                 folder, or absolute)
    hover.predictions       5                     top predictions listed in a hover
    hover.contributors      5                     top components (and heads) listed in a hover
    maxDocumentBytes        2000000               larger documents get only a diagnostic saying so
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

INLAY_MODES = ("probability", "surprisal", "contributor", "off")
RECORD_TO = ("beside", "cache")
SECTION = "hexray"


@dataclass(frozen=True)
class Settings:
    file_patterns: tuple[str, ...] = ("*.prompt",)
    inlay_hints: str = "probability"
    surprise_threshold: float = 0.0
    max_surprise_diagnostics: int = 200
    record_on_save: bool = False
    record_on_save_delay_ms: int = 200
    model: str = "hexray-demo"
    model_factory: str = ""
    device: str = "cpu"
    python: str = ""
    extra_paths: tuple[str, ...] = ()
    worker_nice: int = 10
    worker_threads: int = 0
    record_options: dict = field(default_factory=dict, hash=False, compare=True)
    record_to: str = "beside"
    trace_folder: str = ".hexray/traces"
    hover_predictions: int = 5
    hover_contributors: int = 5
    max_document_bytes: int = 2_000_000

    def worker_key(self) -> tuple:
        """What the worker *process* depends on: a change restarts it.

        A change of model, modelFactory or device does not need a new process: the next request
        carries the new configuration and the warm worker loads that model instead.
        """
        return (self.python, self.extra_paths, self.worker_nice, self.worker_threads)

    def to_json(self) -> dict:
        return {_CAMEL[f.name]: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}


def _jsonable(v):
    return list(v) if isinstance(v, tuple) else v


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(p.capitalize() for p in rest)


_CAMEL = {f.name: _camel(f.name) for f in dataclasses.fields(Settings)}
_CAMEL.update(hover_predictions="hover.predictions", hover_contributors="hover.contributors")
_FIELD_OF = {v: k for k, v in _CAMEL.items()}


# -- validators: value -> checked value, or raise ValueError with what was expected ---------

def _bool(v):
    if isinstance(v, bool):
        return v
    raise ValueError("expected true or false")


def _int_in(lo: int, hi: int):
    def check(v):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != int(v) or not lo <= v <= hi:
            raise ValueError(f"expected a whole number from {lo} to {hi}")
        return int(v)
    return check


def _prob(v):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1:
        raise ValueError("expected a probability from 0 (off) up to, not including, 1")
    return float(v)


def _choice(options):
    def check(v):
        if v not in options:
            raise ValueError("expected one of " + ", ".join(repr(o) for o in options))
        return v
    return check


def _str(v):
    if isinstance(v, str):
        return v.strip()
    raise ValueError("expected a string")


def _factory(v):
    v = _str(v)
    if v and (v.count(":") != 1 or not all(p.strip() for p in v.split(":"))):
        raise ValueError("expected 'package.module:function'")
    return v


def _nonempty_str(v):
    v = _str(v)
    if not v:
        raise ValueError("expected a non-empty string")
    return v


def _str_list(v):
    if isinstance(v, str):
        v = [v]
    if isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v):
        return tuple(x for x in v if x)
    raise ValueError("expected a list of strings")


def _patterns(v):
    v = _str_list(v)
    if not v:
        raise ValueError("expected at least one glob pattern")
    return v


def _dict(v):
    if isinstance(v, dict) and all(isinstance(k, str) for k in v):
        return dict(v)
    raise ValueError("expected an object")


_CHECKS = {
    "file_patterns": _patterns,
    "inlay_hints": _choice(INLAY_MODES),
    "surprise_threshold": _prob,
    "max_surprise_diagnostics": _int_in(0, 100_000),
    "record_on_save": _bool,
    "record_on_save_delay_ms": _int_in(0, 60_000),
    "model": _nonempty_str,
    "model_factory": _factory,
    "device": _nonempty_str,
    "python": _str,
    "extra_paths": _str_list,
    "worker_nice": _int_in(0, 19),
    "worker_threads": _int_in(0, 256),
    "record_options": _dict,
    "record_to": _choice(RECORD_TO),
    "trace_folder": _nonempty_str,
    "hover_predictions": _int_in(0, 50),
    "hover_contributors": _int_in(0, 50),
    "max_document_bytes": _int_in(1_000, 1 << 31),
}


def _flatten(obj: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in obj.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and key not in _FIELD_OF and key != "hexray":
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def unwrap(options: Any) -> dict:
    """The settings object from initializationOptions / didChangeConfiguration payloads."""
    if not isinstance(options, dict):
        return {}
    if isinstance(options.get("settings"), dict):  # didChangeConfiguration: {"settings": {"hexray": {...}}}
        options = options["settings"]
    if isinstance(options.get(SECTION), dict):
        options = options[SECTION]
    return options


def parse(options: Any, base: Settings | None = None) -> tuple[Settings, list[str]]:
    """Settings from a client's JSON object; unknown keys are ignored, bad values fall back to defaults.

    Returns the settings and one message per value that was not used.
    """
    defaults = Settings()
    if options is None:
        return base or defaults, []
    if not isinstance(options, dict):
        return base or defaults, [f"HexRay settings must be an object, not {type(options).__name__}: using defaults"]
    values: dict[str, Any] = {}
    problems: list[str] = []
    for key, raw in _flatten(unwrap(options)).items():
        name = _FIELD_OF.get(key)
        if name is None:
            continue
        if raw is None:
            continue  # "unset": keep the default
        try:
            values[name] = _CHECKS[name](raw)
        except ValueError as e:
            default = _jsonable(getattr(defaults, name))
            problems.append(f"hexray.{key} = {raw!r} is not valid ({e}); using the default {default!r}")
    return dataclasses.replace(defaults, **values), problems
