"""How a token is shown as text, in one place for the terminal, the language server and the viewer's data.

A token is quoted so that spaces and line breaks stay visible (``" Paris"``, ``"\\n"``). A token that holds
only part of a UTF-8 character is shown by its bytes as ``\\xNN``: passed in as ``surrogateescape`` code
points (`bytes_text`), or, with ``literal_byte_escapes``, already spelled ``\\xNN`` in the text (the labels of
`Run.labels`), which are then printed as such rather than with a doubled backslash.
"""

from __future__ import annotations

import json
import unicodedata

KEEP_FORMAT = {"\u200d", "\u200c", "\ufe0f", "\ufe0e"}  # ZWJ/ZWNJ and variation selectors belong to emoji


def quote(token: str, *, literal_byte_escapes: bool = False) -> str:
    """A token as a visible, escaped string: `" Paris"`, `"\\n"`. Quotes make spaces visible.

    Bytes that are not whole UTF-8 characters, passed in as ``surrogateescape`` code points
    (see `bytes_text`), show as ``\\xNN``.
    """
    out = []
    body = json.dumps(token, ensure_ascii=False)[1:-1]
    if literal_byte_escapes:
        body = body.replace("\\\\x", "\\x")
    for ch in body:
        cp = ord(ch)
        cat = unicodedata.category(ch)
        if 0xDC80 <= cp <= 0xDCFF:
            out.append(f"\\x{cp - 0xDC00:02X}")
        elif ch in KEEP_FORMAT or cat not in ("Cc", "Zl", "Zp", "Cs", "Cf"):
            out.append(ch)
        else:
            out.append(f"\\u{cp:04x}" if cp <= 0xFFFF else f"\\U{cp:08x}")
    return '"' + "".join(out) + '"'


def bytes_text(raw: bytes) -> str:
    """Decode bytes that may start or end inside a character; stray bytes become surrogate escapes."""
    return raw.decode("utf-8", "surrogateescape")


def running_texts(prompt: str, char_spans, token_strs: list[str]) -> list[str]:
    """Each token's share of the prompt's text, so that the tokens read end to end as the prompt itself: the
    text of its char span not already shown by an earlier token. Tokens that split one character (an emoji in
    byte tokens) share its span: the first shows the whole character, the rest show "". A token with no span
    (BOS, a special token) or without spans at all shows its token string."""
    if not char_spans or len(char_spans) != len(token_strs):
        return list(token_strs)
    out, shown = [], 0
    for text, span in zip(token_strs, char_spans, strict=True):
        start, end = (int(v) for v in span)
        if not 0 <= start <= end <= len(prompt):
            out.append(text)
            continue
        out.append(prompt[max(start, shown):end])
        shown = max(shown, end)
    return out
