"""Recording: load a model as a TransformerLens bridge and stream its forward pass into a trace.

    from hexray_core.record import record, Recorder
    record("Hello world", model="hexray-demo", output="t.hxr")

Modules: models (loading), hooks (hook sets and names), capture (streaming hooks -> writer),
tokens (token strings and spans), kit (model kit), generate (--generate), recorder (the API).
Imports are lazy: ``import hexray_core.record.tokens`` does not import torch.
"""

from __future__ import annotations

__all__ = ["Recorder", "RecordResult", "record", "load_model", "from_objects"]


def __getattr__(name: str):
    if name in ("Recorder", "RecordResult", "record"):
        from . import recorder

        return getattr(recorder, name)
    if name in ("load_model", "from_objects"):
        from . import models

        return getattr(models, name)
    raise AttributeError(name)
