"""Open documents as the server sees them: text, version, whether HexRay serves them, line index.

Documents are kept from the notifications' own text (the server asks for full sync), not from
pygls' `TextDocument`, whose line handling differs from LSP's (see `line_index`).
"""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pygls.uris import to_fs_path

from .settings import Settings

if TYPE_CHECKING:
    from .line_index import LineIndex

LANGUAGE_ID = "hexray-prompt"


@dataclass
class Document:
    uri: str
    text: str
    version: int | None
    language_id: str = ""
    path: str | None = None  # file system path, None for untitled: and other non-file URIs
    _index: LineIndex | None = field(default=None, repr=False)
    _unusable: tuple | None = field(default=None, repr=False)

    def index(self, encoding: str) -> LineIndex:
        if self._index is None or self._index.encoding != encoding:
            from .line_index import LineIndex  # numpy: imported after the handshake, not at start-up

            self._index = LineIndex(self.text, encoding)
        return self._index

    @property
    def name(self) -> str:
        return os.path.basename(self.path) if self.path else self.uri.rsplit("/", 1)[-1]


def fs_path(uri: str) -> str | None:
    if not uri.startswith("file:"):
        return None
    try:
        return to_fs_path(uri)
    except Exception:  # a malformed URI is not a file we can find traces beside
        return None


def is_served(doc: Document, settings: Settings) -> bool:
    """Whether HexRay shows anything for this document."""
    if doc.language_id == LANGUAGE_ID:
        return True
    target = doc.path or doc.uri
    base = os.path.basename(target)
    for pattern in settings.file_patterns:
        if "/" in pattern or os.sep in pattern:
            full = pattern if pattern.startswith(("/", "*")) else "*/" + pattern
            if fnmatch.fnmatch(target.replace(os.sep, "/"), full):
                return True
        elif fnmatch.fnmatch(base, pattern):
            return True
    return False


def unusable_reason(doc: Document, settings: Settings) -> str | None:
    """Why a served document gets no hovers or hints (binary, too large), or None (cached per text)."""
    key = settings.max_document_bytes
    if doc._unusable is not None and doc._unusable[0] == key:
        return doc._unusable[1]
    reason = _unusable(doc.text, settings)
    doc._unusable = (key, reason)
    return reason


def _unusable(text: str, settings: Settings) -> str | None:
    if "\x00" in text:
        return "the document looks binary (it contains NUL characters): HexRay shows nothing for it"
    if len(text) * 4 > settings.max_document_bytes:
        size = len(text.encode("utf-8", "surrogatepass"))
        if size > settings.max_document_bytes:
            return (f"the document is {size:,} bytes, over hexray.maxDocumentBytes ({settings.max_document_bytes:,}):"
                    " HexRay shows nothing for it")
    return None


class DocumentStore:
    def __init__(self):
        self._docs: dict[str, Document] = {}

    def open(self, uri: str, text: str, version: int | None, language_id: str) -> Document:
        doc = Document(uri=uri, text=text, version=version, language_id=language_id or "", path=fs_path(uri))
        self._docs[uri] = doc
        return doc

    def update(self, uri: str, text: str, version: int | None) -> Document | None:
        doc = self._docs.get(uri)
        if doc is None:
            return None
        doc.text = text
        doc.version = version
        doc._index = None
        doc._unusable = None
        return doc

    def close(self, uri: str) -> None:
        self._docs.pop(uri, None)

    def get(self, uri: str) -> Document | None:
        return self._docs.get(uri)

    def __iter__(self):
        return iter(list(self._docs.values()))

    def __len__(self) -> int:
        return len(self._docs)
