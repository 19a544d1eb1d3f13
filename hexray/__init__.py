"""HexRay: an X-ray for transformer language models.

    import hexray
    t = hexray.record("The capital of France is", model="hexray-demo", output="t.hxr")   # the opened Trace
    t = hexray.open("t.hxr")                     # later, anywhere: numpy only (framework="pt": torch tensors)
    run = t[0]                                   # a TransformerLens ActivationCache that needs no model
    run["resid_post", 1]; run.decompose_resid(pos_slice=-1, return_labels=True)
    t.attribution(position=-1).top(10)           # HexRay's own views: attribution, logit_lens, attention, cot

``hexray.record`` needs the recording extras (torch, transformer-lens) and imports them only when
called; everything else reads a trace with numpy alone. To record many times without reloading
the model: ``rec = hexray.Recorder("hexray-demo"); rec.record(prompts, "t.hxr")``.
``hexray.load_dictionary(path)`` reads a sparse autoencoder or transcoder set (numpy: ``encode``, ``decode``);
``run.features(d, layer)`` gives a run's features. ``hexray.open_dataset("out/")`` opens a folder written by
``hexray record --prompts-file F -o out/``.
API reference: docs/api.md.
"""

from __future__ import annotations

import importlib

from hexray_core import __version__  # noqa: F401 (public, in __all__)
from hexray_core.replay import display as _display

#: name -> module it lives in (imported on first use: `import hexray` stays cheap)
_LAZY = {
    "Trace": "hexray_core.replay.trace",
    "Run": "hexray_core.replay.trace",
    "MissingHook": "hexray_core.replay.trace",
    "Slice": "hexray_core.replay.cache",
    "get_act_name": "hexray_core.replay.cache",
    "Attribution": "hexray_core.replay.attribution",
    "Contribution": "hexray_core.replay.attribution",
    "direct_logit_attribution": "hexray_core.replay.attribution",
    "logit_lens": "hexray_core.replay.lens",
    "attention_summary": "hexray_core.replay.attention",
    "residual_trace": "hexray_core.replay.residual",
    "cot_breakdown": "hexray_core.replay.cot",
    "attribution_diff": "hexray_core.replay.diff",
    "HexRayError": "hexray_core.errors",
    "load_dictionary": "hexray_core.replay.dictionary",
    "dictionary_input": "hexray_core.replay.features",
    "Recorder": "hexray_core.record.recorder",
}

__all__ = sorted(["__version__", "open", "open_dataset", "record", *_LAZY])  # noqa: PLE0605 (built from _LAZY)


def _recorder_module():
    from hexray.recording import import_recorder

    return import_recorder()


def __getattr__(name: str):
    if name == "Recorder":  # keeps a model loaded across many recordings; without torch: the install line
        return _recorder_module().Recorder
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hexray' has no attribute {name!r}")


def __dir__() -> list[str]:
    return list(__all__)


def record(prompts, model="gpt2", output=None, **opts):
    """Record one prompt (a str) or many (a list: one run each) into a trace; return it opened (a `Trace`,
    its file at ``t.path``).

    ``model``: a hub id (default ``gpt2``), a local ``save_pretrained`` folder, a ``.gguf`` file,
    ``"hexray-demo"``, an already loaded ``TransformerBridge``, or a Hugging Face model together with
    ``tokenizer=...`` (a bridge or model object is switched to TransformerLens compatibility mode,
    which rewrites its weights in place). ``output``: the trace path (default: a new file in
    ``$HEXRAY_CACHE/traces``).

    Options: ``hooks`` ("default", "full", or names/globs), ``act_dtype`` ("auto", "float32",
    "float16", "bfloat16"), ``top_k`` (20), ``generate`` (N tokens), ``temperature``, ``seed``,
    ``prepend_bos``, ``bundle`` (embed the model kit), ``device``, ``dtype``, ``n_devices``,
    ``device_map``, ``trust_remote_code``, ``revision``, ``cache_dir``, ``interventions`` (a list of
    ``--intervene`` specs, e.g. ``["L1H2=0", "blocks.2.hook_resid_pre@5<-clean.hxr"]``), ``grad`` (a
    ``--grad`` metric such as ``'logit-diff:" Mary"," John"'``: also store its gradients), ``dict`` (a
    dictionary path, reference or ``load_dictionary`` result, or a list: as ``--dict``, its features are stored
    and feature interventions such as ``"L1F12*8"`` use it), ``progress`` (a callable
    ``progress(event, **info)``), ``framework`` of the returned trace ("np" or "pt").
    """
    framework = opts.pop("framework", "np")
    dicts = opts.pop("dict", None)
    if dicts is not None:
        from hexray_core.dataset.record_features import feature_dictionaries, load_dictionaries

        dsets = load_dictionaries(dicts)
        opts["features"] = feature_dictionaries(dsets)
        if dsets:
            return open(_record_with_features(prompts, model, output, dsets, opts), framework=framework)
    return open(_recorder_module().record(prompts, model=model, output=output, **opts), framework=framework)


def _record_with_features(prompts, model, output, dsets, opts) -> str:
    """``record(..., dict=...)``: a Recorder, so the stored features (``RunExtra``) can read its model."""
    from hexray_core.dataset.record_features import run_extra

    mod = _recorder_module()
    load = {k: opts.pop(k) for k in ("tokenizer", "device", "dtype", "n_devices", "device_map", "trust_remote_code",
                                     "revision") if k in opts}
    rec = mod.Recorder(model, progress=opts.get("progress"), **load)
    return rec.record(prompts, output, extra=run_extra(rec, dsets), **opts).path


def _show(trace, run, position, **kw):
    """`Trace.show` / `Run.show` and their notebook display: the viewer, imported when first shown."""
    from hexray_view.notebook import show

    return show(trace, run, position, **kw)


def open(path, framework: str = "np"):  # noqa: A001 - hexray.open(path) is the public name
    """Open a trace for replay: its runs are TransformerLens caches of numpy arrays (no torch needed),
    or of torch tensors sharing the trace's memory with ``framework="pt"``."""
    from hexray_core.replay.trace import open_trace

    return open_trace(path, framework=framework)


def open_dataset(path):
    """Open a recorded dataset folder: iterate its runs across shards, aggregate their attribution (numpy only)."""
    from hexray_core.dataset.reader import open_dataset as _open_dataset

    return _open_dataset(path)


_display.use_viewer(_show)  # the replay layer shows traces through hexray_view without importing it
