"""Exact mapping between Python string offsets and LSP positions.

Python ``str`` offsets are code points. An LSP ``Position`` is a line and a column counted in the
units of the negotiated position encoding:

    utf-16  UTF-16 code units (a character outside the BMP, e.g. most emoji, is 2)   VS Code
    utf-8   UTF-8 bytes (``ï`` is 2, ``😀`` is 4)                                      Neovim 0.11+
    utf-32  code points, i.e. Python offsets                                         Emacs 29 eglot

LSP breaks lines only at ``\\n``, ``\\r\\n`` and ``\\r``. ``str.splitlines`` (and so pygls'
``TextDocument.lines``) also breaks at U+2028, U+2029, ``\\x0b``, ``\\x0c``, ``\\x1c-\\x1e`` and
``\\x85``, which prompts scraped from the web do contain: this index never uses it.

A client may send a column that falls inside a character (the second UTF-16 unit of an emoji,
or a byte inside a UTF-8 sequence): ``offset`` maps it to the start of that character. A
column past the end of a line means the end of the line (LSP 3.17 §Position); a line past the
end of the document means the end of the document. An offset between the ``\\r`` and ``\\n`` of
one line break (a tokenizer may split them) has no position of its own and maps to the end of
its line. Combining marks are code points of their own, exactly as every encoding counts them.

Non-ASCII lines get a cumulative-units table built once, lazily, with numpy, so converting
thousands of token ends on one long line stays O(1) each.
"""

from __future__ import annotations

import bisect
import re

import numpy as np

UTF8, UTF16, UTF32 = "utf-8", "utf-16", "utf-32"
ENCODINGS = (UTF8, UTF16, UTF32)

_EOL = re.compile(r"\r\n|\r|\n")


def units(s: str, encoding: str) -> int:
    """Length of ``s`` in the units of ``encoding``."""
    if encoding == UTF32 or s.isascii():
        return len(s)
    if encoding == UTF8:
        return len(s.encode("utf-8", "surrogatepass"))
    return len(s.encode("utf-16-le", "surrogatepass")) // 2


def _unit_widths(line: str, encoding: str) -> np.ndarray:
    cps = np.frombuffer(line.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    if encoding == UTF8:
        return np.where(cps < 0x80, 1, np.where(cps < 0x800, 2, np.where(cps < 0x10000, 3, 4)))
    return np.where(cps > 0xFFFF, 2, 1)


class LineIndex:
    """Positions <-> offsets for one version of a text in one encoding. Immutable."""

    __slots__ = ("text", "encoding", "starts", "ends", "_cum", "_ascii", "_starts_np")

    def __init__(self, text: str, encoding: str = UTF16):
        if encoding not in ENCODINGS:
            encoding = UTF16
        self.text = text
        self.encoding = encoding
        starts, ends = [0], []
        for m in _EOL.finditer(text):
            ends.append(m.start())
            starts.append(m.end())
        ends.append(len(text))
        self.starts: list[int] = starts  # offset where each line begins
        self.ends: list[int] = ends  # offset where each line's content ends (before its line break)
        self._ascii = encoding == UTF32 or text.isascii()
        self._cum: dict[int, np.ndarray | None] = {}
        self._starts_np = np.asarray(starts, dtype=np.int64)

    @property
    def line_count(self) -> int:
        return len(self.starts)

    def line_of(self, offset: int) -> int:
        return bisect.bisect_right(self.starts, offset) - 1

    def _table(self, line: int) -> np.ndarray | None:
        """Cumulative units before each character of the line (None when units == code points)."""
        if self._ascii:
            return None
        if line not in self._cum:
            s = self.text[self.starts[line]:self.ends[line]]
            if s.isascii() or self.encoding == UTF32:
                self._cum[line] = None
            else:
                cum = np.zeros(len(s) + 1, dtype=np.int64)
                np.cumsum(_unit_widths(s, self.encoding), out=cum[1:])
                self._cum[line] = cum
        return self._cum[line]

    # -- offset -> position ----------------------------------------------------------------

    def position(self, offset: int) -> tuple[int, int]:
        """(line, column in units) of a code point offset; clamped to the text."""
        offset = min(max(offset, 0), len(self.text))
        line = self.line_of(offset)
        col = min(offset, self.ends[line]) - self.starts[line]
        cum = self._table(line)
        return line, col if cum is None else int(cum[col])

    def positions(self, offsets) -> tuple[np.ndarray, np.ndarray]:
        """Vectorised ``position`` for many offsets: (lines, columns) arrays."""
        offs = np.clip(np.asarray(offsets, dtype=np.int64), 0, len(self.text))
        lines = np.searchsorted(self._starts_np, offs, side="right") - 1
        ends = np.asarray(self.ends, dtype=np.int64)
        cols = np.minimum(offs, ends[lines]) - self._starts_np[lines]
        if not self._ascii:
            for line in np.unique(lines):
                cum = self._table(int(line))
                if cum is not None:
                    sel = lines == line
                    cols[sel] = cum[cols[sel]]
        return lines, cols

    # -- position -> offset ----------------------------------------------------------------

    def offset(self, line: int, character: int) -> int:
        """Code point offset of a position; inside a character -> that character's start."""
        if line < 0:
            return 0
        if line >= len(self.starts):
            return len(self.text)
        start, end = self.starts[line], self.ends[line]
        character = max(character, 0)
        cum = self._table(line)
        if cum is None:
            return min(start + character, end)
        if character >= cum[-1]:
            return end
        return start + int(np.searchsorted(cum, character, side="right")) - 1

    def offset_ceil(self, line: int, character: int) -> int:
        """Like ``offset`` but a column inside a character maps to that character's end (for range ends)."""
        off = self.offset(line, character)
        if 0 <= line < len(self.starts) and off < self.ends[line]:
            ln, col = self.position(off)
            if col < character:
                return off + 1
        return off

    def __repr__(self) -> str:
        return f"<LineIndex {len(self.text)} chars, {self.line_count} lines, {self.encoding}>"
