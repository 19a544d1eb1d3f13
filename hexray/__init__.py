"""HexRay: an X-ray for transformer language models.

    import hexray
    path = hexray.record("The capital of France is", model="hexray-demo", output="t.hxr")
    trace = hexray.open(path)

``hexray.record`` needs the recording extras (torch, transformer-lens) and imports them only when
called; ``hexray.open`` reads a trace with numpy alone. To record many times without reloading
the model: ``rec = hexray.Recorder("hexray-demo"); rec.record(prompts, "t.hxr")``.
"""

from __future__ import annotations

from hexray_core import __version__

__all__ = ["Recorder", "__version__", "open", "record"]


def _recorder_module():
    """hexray_core.record.recorder, or the CLI's one-line install advice when torch & co are missing."""
    from hexray_core.errors import record_extra_missing

    try:
        from hexray_core.record import recorder
    except ModuleNotFoundError as e:
        advice = record_extra_missing(e)
        if advice is not None:
            raise advice from None
        raise
    return recorder


def __getattr__(name: str):
    if name == "Recorder":  # keeps a model loaded across many recordings: hexray.Recorder("hexray-demo")
        return _recorder_module().Recorder
    raise AttributeError(name)


def record(prompts, model="gpt2", output=None, **opts) -> str:
    """Record one prompt (a str) or many (a list: one run each) into a trace; return its path.

    ``model``: a hub id (default ``gpt2``), a local ``save_pretrained`` folder, a ``.gguf`` file,
    ``"hexray-demo"``, an already loaded ``TransformerBridge``, or a Hugging Face model together with
    ``tokenizer=...`` (a bridge or model object is switched to TransformerLens compatibility mode,
    which rewrites its weights in place). ``output``: the trace path (default: a new file in
    ``$HEXRAY_CACHE/traces``).

    Options: ``hooks`` ("default", "full", or names/globs), ``act_dtype`` ("auto", "float32",
    "float16", "bfloat16"), ``top_k`` (20), ``generate`` (N tokens), ``temperature``, ``seed``,
    ``prepend_bos``, ``bundle`` (embed the model kit), ``device``, ``dtype``, ``n_devices``,
    ``device_map``, ``trust_remote_code``, ``revision``, ``cache_dir``, ``progress`` (a callable
    ``progress(event, **info)``).
    """
    return _recorder_module().record(prompts, model=model, output=output, **opts)


def open(path):  # noqa: A001 - hexray.open(path) is the public name
    """Open a trace for replay (numpy only; no torch needed)."""
    from hexray_core.replay.trace import open_trace

    return open_trace(path)
