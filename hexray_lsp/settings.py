"""Typed settings of `hexray lsp`, with defaults.

The client sends them as ``initializationOptions`` (either the settings object itself or
``{"hexray": {...}}``), in ``workspace/didChangeConfiguration`` and, when it supports
``workspace/configuration``, on request (section ``hexray``). Keys are camelCase as in an editor's
settings file; nested objects and dotted keys (``"hover.predictions": 8``) are both accepted.

A value of the wrong type or out of range does not stop the server: that setting falls back to
its default and `parse` returns a message saying so, which the server shows once.

Each setting is declared once, below, as a field of `Settings` with its check, its editor key
and its meaning; `describe()` renders the list (appended to this docstring, and shown by
``hexray lsp --help``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

INLAY_MODES = ("probability", "surprisal", "contributor", "feature", "off")
RECORD_TO = ("beside", "cache")
SECTION = "hexray"


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


def _share(v):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
        raise ValueError("expected a share from 0 to 1")
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




def setting(default, check, doc: str, *, key: str | None = None, compare: bool = True):
    """One setting: its default, the check of a client's value, its meaning, and its editor key
    (camelCase of the field name unless given)."""
    factory = {"default_factory": (lambda: dict(default))} if isinstance(default, dict) else {"default": default}
    return field(**factory, compare=compare, hash=False if isinstance(default, dict) else None,
                 metadata={"check": check, "doc": doc, "key": key})


@dataclass(frozen=True)
class Settings:
    file_patterns: tuple[str, ...] = setting(
        ("*.prompt",), _patterns, 'documents served: a glob without "/" matches the file name, one with "/" the '
        "path; documents with language id hexray-prompt are always served")
    inlay_hints: str = setting("probability", _choice(INLAY_MODES), "probability | surprisal | contributor | feature "
                                                                     "(the top feature; needs features.dictionary) | "
                                                                     "off")
    surprise_threshold: float = setting(0.0, _prob, "mark tokens given a probability below this (0..1; 0 = off)")
    max_surprise_diagnostics: int = setting(200, _int_in(0, 100_000), "at most this many surprising-token "
                                                                       "diagnostics")
    record_on_save: bool = setting(False, _bool, "record the trace again when the document is saved")
    record_on_save_delay_ms: int = setting(200, _int_in(0, 60_000), "debounce: wait this long after the last save")
    model: str = setting("hexray-demo", _nonempty_str, "model the worker records with: a name, hub id or folder")
    model_factory: str = setting(
        "", _factory, '"package.module:function" returning an already built model (a TransformerBridge, a '
        '(model, tokenizer) pair or {"model", "tokenizer"}); overrides model. Tests use it for tiny in-memory models')
    device: str = setting("cpu", _nonempty_str, "torch device of the worker: cpu, cuda, cuda:1, mps, auto")
    python: str = setting("", _str, "the worker's interpreter (needs hexray + torch); empty: the server's own")
    extra_paths: tuple[str, ...] = setting((), _str_list, "prepended to the worker's sys.path (modelFactory modules)")
    worker_nice: int = setting(10, _int_in(0, 19), "the worker's CPU niceness (0-19): recording never starves the "
                                                   "server's answers")
    worker_threads: int = setting(0, _int_in(0, 256), "torch CPU threads in the worker; 0: half the cores")
    record_options: dict = setting({}, _dict, 'extra keyword arguments for the recorder, e.g. {"top_k": 20, '
                                              '"bundle": true, "act_dtype": "float32"}')
    record_to: str = setting("beside", _choice(RECORD_TO), "beside (name.hxr next to name.prompt) | cache "
                                                           "(traceFolder)")
    trace_folder: str = setting(".hexray/traces", _nonempty_str, "the workspace trace folder (relative to the "
                                                                 "workspace folder, or absolute)")
    hover_predictions: int = setting(5, _int_in(0, 50), "top predictions listed in a hover", key="hover.predictions")
    hover_contributors: int = setting(5, _int_in(0, 50), "top components (and heads) listed in a hover",
                                      key="hover.contributors")
    hover_sources: int = setting(5, _int_in(0, 50), "source tokens listed in a hover (0 = none)", key="hover.sources")
    features_dictionary: str = setting(
        "", _str, "a dictionary (SAE or transcoders: folder, file, hexray-demo-sae, sae-lens:RELEASE/ID; relative to "
        "the workspace folder) whose top features the hover lists; empty: none", key="features.dictionary")
    hover_features: int = setting(5, _int_in(0, 50), "top features listed in a hover (with features.dictionary)",
                                  key="hover.features")
    highlight_threshold: float = setting(
        0.1, _share, "highlight the source tokens of a prediction whose |total| is at least this share of the "
        "largest (0..1)", key="highlights.threshold")
    max_highlights: int = setting(20, _int_in(0, 1000), "at most this many source highlights (0 = off)",
                                  key="highlights.max")
    max_document_bytes: int = setting(2_000_000, _int_in(1_000, 1 << 31), "larger documents get only a diagnostic "
                                                                          "saying so")

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


_FIELDS = {f.name: f for f in dataclasses.fields(Settings)}
_CAMEL = {name: f.metadata["key"] or _camel(name) for name, f in _FIELDS.items()}
_FIELD_OF = {v: k for k, v in _CAMEL.items()}




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
            values[name] = _FIELDS[name].metadata["check"](raw)
        except ValueError as e:
            default = _jsonable(getattr(defaults, name))
            problems.append(f"hexray.{key} = {raw!r} is not valid ({e}); using the default {default!r}")
    return dataclasses.replace(defaults, **values), problems


def describe() -> str:
    """The settings, one per line: editor key, default, meaning."""
    defaults = Settings()
    lines = []
    for name, f in _FIELDS.items():
        lines.append(f"    {_CAMEL[name]:<24} {_jsonable(getattr(defaults, name))!r:<18} {f.metadata['doc']}")
    return "\n".join(lines)


__doc__ = (__doc__ or "") + "\nSettings (editor key, default, meaning):\n\n" + describe() + "\n"
