"""Errors a user can cause. The CLI prints them as one line and exits non-zero."""

from __future__ import annotations


class HexRayError(Exception):
    """A problem with the user's input or environment (bad path, unknown model, bad position...)."""


def one_line(text: str) -> str:
    """A message as one terminal line: newlines, tabs and other control characters escaped (a file
    name can hold a newline; a message must still be one line)."""
    return text if text.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
