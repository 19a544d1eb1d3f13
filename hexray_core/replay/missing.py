"""The error for a tensor a run did not record, naming the ``--hooks`` that records it."""

from __future__ import annotations

import re

from hexray_core.errors import HexRayError


class MissingHook(HexRayError, KeyError):
    """A tensor the run did not record; the message names it and the ``--hooks`` that records it."""

    def __init__(self, trace, run: int, name: str, why: str = ""):
        glob = re.sub(r"^blocks\.\d+\.", "blocks.*.", name)
        recorded = hook_set(trace.meta)
        need = f"{why} needs {name}" if why else f"run {run} has no {name}"
        super().__init__(f"{need}, which {trace.path} did not record (hooks: {recorded}); record it with "
                         f"--hooks default,{glob}")

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def hook_set(meta: dict) -> str:
    hooks = meta.get("hooks") if isinstance(meta.get("hooks"), dict) else {}
    return str(hooks.get("set", "unknown"))
