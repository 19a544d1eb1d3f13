"""Errors a user can cause. The CLI prints them as one line and exits non-zero."""

from __future__ import annotations


class HexRayError(Exception):
    """A problem with the user's input or environment (bad path, unknown model, bad position...)."""


class RecordExtraMissing(HexRayError, ImportError):
    """Recording was asked for on an install without the [record] extra (torch, TransformerLens).

    An ImportError too, so `except ImportError` around `hexray.record(...)` still works."""


RECORD_MODULES = ("torch", "transformer_lens", "transformers")


def record_extra_missing(e: ModuleNotFoundError) -> RecordExtraMissing | None:
    """The one-line install advice for a missing recording dependency (None: another module is missing)."""
    top = (e.name or "").split(".")[0]
    if top not in RECORD_MODULES:
        return None
    return RecordExtraMissing(f"recording needs {top}, which is not installed: pip install 'hexray[record]' (on a "
                              "CPU-only machine install torch's CPU build first, e.g. pip install torch==2.13.0); "
                              "replaying traces needs neither")


def one_line(text: str) -> str:
    """A message as one terminal line: newlines, tabs and other control characters escaped (a file
    name can hold a newline; a message must still be one line)."""
    return text if text.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def json_problem(e) -> str:
    """A json.JSONDecodeError in full, as one line: what was expected and where (its message alone, "Expecting ','
    delimiter", does not say where in a long line)."""
    where = f"line {e.lineno} column {e.colno}" if "\n" in (e.doc or "") else f"column {e.colno}"
    return one_line(f"{e.msg} at {where}")
