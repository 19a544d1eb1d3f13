"""pygls protocol with pre-serialised results.

pygls turns every result into JSON through cattrs, which for thousands of inlay hints costs far
more than computing them (about 100 ms for 6,000 hints on this machine). A handler may return a
`RawJSON` whose text is already the JSON of the result (cached per trace and encoding); it is
spliced into the response as is.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging

from pygls.protocol import LanguageServerProtocol

log = logging.getLogger(__name__)


class RawJSON:
    """A result that is already JSON text (ASCII only)."""

    __slots__ = ("text",)

    def __init__(self, text: str):
        self.text = text

    def value(self):
        return json.loads(self.text)


class HexRayProtocol(LanguageServerProtocol):
    def _send_response(self, msg_id, result=None, error=None):
        if error is None and isinstance(result, RawJSON):
            if self.writer is None or not hasattr(self, "_include_headers"):
                return super()._send_response(msg_id, result=result.value(), error=None)
            self._result_types.pop(msg_id, None)
            body = ('{"id":' + json.dumps(msg_id) + ',"jsonrpc":"' + self.VERSION + '","result":' + result.text
                    + "}").encode(self.CHARSET)
            if self._include_headers:
                body = (f"Content-Length: {len(body)}\r\n"
                        f"Content-Type: {self.CONTENT_TYPE}; charset={self.CHARSET}\r\n\r\n").encode("ascii") + body
            try:
                res = self.writer.write(body)
                if inspect.isawaitable(res):
                    asyncio.ensure_future(res)
            except BrokenPipeError:
                log.error("client connection lost while sending a response")
                raise
            return None
        if isinstance(result, RawJSON):
            result = result.value()
        return super()._send_response(msg_id, result=result, error=error)
