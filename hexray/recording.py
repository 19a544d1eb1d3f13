"""The recorder, imported on demand: torch and TransformerLens are an extra (`pip install 'hexray[record]'`).

Shared by `hexray.record` / `hexray.Recorder` and the CLI's record, one-shot and fuzz commands. Not imported
by the replay side (import-linter checks that nothing there reaches `hexray_core.record`).
"""

from __future__ import annotations

from hexray_core.errors import record_extra_missing


def import_recorder():
    """hexray_core.record.recorder, or the one-line install advice when torch & co are missing."""
    try:
        from hexray_core.record import recorder
    except ModuleNotFoundError as e:
        advice = record_extra_missing(e)
        if advice is not None:
            raise advice from None
        raise
    return recorder
