"""HexRay: an X-ray for transformer language models.

    import hexray
    path = hexray.record("The capital of France is", model="hexray-demo", output="t.hxr")
    trace = hexray.open(path)

``hexray.record`` needs the recording extras (torch, transformer-lens) and imports them only when
called; ``hexray.open`` reads a trace with numpy alone. To record many times without reloading
the model: ``rec = hexray.Recorder("hexray-demo"); rec.record(prompts, "t.hxr")``.
``hexray.open_dataset("out/")`` opens a folder written by ``hexray record --prompts-file F -o out/``.
"""

from __future__ import annotations

from hexray_core import __version__

__all__ = ["Recorder", "__version__", "open", "open_dataset", "record"]


def __getattr__(name: str):
    if name == "Recorder":  # keeps a model loaded across many recordings: hexray.Recorder("hexray-demo")
        from hexray_core.record.recorder import Recorder

        return Recorder
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
    from hexray_core.record.recorder import record as _record

    return _record(prompts, model=model, output=output, **opts)


def open(path):  # noqa: A001 - hexray.open(path) is the public name
    """Open a trace for replay (numpy only; no torch needed)."""
    from hexray_core.replay.trace import open_trace

    return open_trace(path)


def open_dataset(path):
    """Open a recorded dataset folder: iterate its runs across shards, aggregate their attribution (numpy only)."""
    from hexray_core.replay.aggregate import open_dataset as _open_dataset

    return _open_dataset(path)
