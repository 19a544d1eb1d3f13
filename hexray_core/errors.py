"""Errors a user can cause. The CLI prints them as one line and exits non-zero."""

from __future__ import annotations


class HexRayError(Exception):
    """A problem with the user's input or environment (bad path, unknown model, bad position...)."""
