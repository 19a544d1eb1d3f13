"""How a `Trace` or `Run` shows itself in a notebook: through the viewer a higher layer plugs in.

The replay layer draws nothing and imports no viewer (the layers contract in pyproject.toml). `hexray`,
the public package, plugs in `hexray_view.notebook.show`, which is imported when a cell first shows a
trace; without it a trace displays as its text repr and `show()` says what to import.
"""

from __future__ import annotations

from collections.abc import Callable

from hexray_core.errors import HexRayError

_viewer: Callable | None = None


def use_viewer(show: Callable | None) -> None:
    """Plug in ``show(trace, run, position, **kw)``, returning an object with ``_repr_html_`` (None: unplug)."""
    global _viewer
    _viewer = show


def has_viewer() -> bool:
    return _viewer is not None


def show(trace, run: int, position: int | None, **kw):
    if _viewer is None:
        raise HexRayError("no viewer is plugged in: `import hexray` first (it shows traces with hexray_view)")
    return _viewer(trace, run, position, **kw)
