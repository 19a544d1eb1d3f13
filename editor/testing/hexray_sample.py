"""A recorded sample trace for the editor client checks.

The editor checks (``tests/test_editors.py``, ``npm run check`` in ``editor/vscode``) need a real trace
but no download: they record with ``hexray-demo``, the small GPT-2 shipped with HexRay
(hexray_core/models/hexray-demo), the model the server uses by default.

    record_sample(folder)     writes sample.prompt and records sample.hxr beside it (model kit bundled)

    python editor/testing/hexray_sample.py FOLDER      the same from a shell; prints the trace path
"""

from __future__ import annotations

import os
import sys

MODEL = "hexray-demo"

#: ASCII words, an emoji (several byte-level tokens share its span) and an accented word.
SAMPLE = ("It is a truth universally acknowledged, that a single man in possession of a good fortune 🙂\n"
          "must be in want of a naïve wife.\n")


def record_sample(folder: str, text: str = SAMPLE, name: str = "sample", model: str = MODEL) -> str:
    """Write ``folder/name.prompt`` and record ``folder/name.hxr``; return the trace path."""
    import hexray

    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"{name}.prompt"), "w", encoding="utf-8", newline="") as f:
        f.write(text)
    trace = hexray.record(text, model=model, output=os.path.join(folder, f"{name}.hxr"), device="cpu", bundle=True)
    trace.close()
    return trace.path


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python editor/testing/hexray_sample.py FOLDER")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(record_sample(sys.argv[1]))
