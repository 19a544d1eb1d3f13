"""A tiny offline model and a recorded sample trace for the editor client checks.

The editor checks (``tests/test_editors.py``, ``npm run check`` in ``editor/vscode``) need a real trace
but no download: they use the tiny GPT-2 of ``tests/tiny_models.py`` (2 layers, random weights, a
byte-level BPE tokenizer trained in memory).

    factory()                 the record worker's modelFactory: "tiny_model:factory", with
                              extraPaths [<repo>/editor/testing]
    record_sample(folder)     writes sample.prompt and records sample.hxr beside it (model kit bundled)

    python editor/testing/tiny_model.py FOLDER      the same from a shell; prints the trace path
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))

#: A prompt with ASCII, an emoji (several byte-level tokens share its span) and accented text.
SAMPLE = "The cat 🐱 sat on the mat.\nAlice and Bob went to the store. naïve\n"


def _tiny_models():
    tests = os.path.join(REPO, "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    import tiny_models

    return tiny_models


def factory():
    """(model, tokenizer): the tiny GPT-2 with n_ctx 256."""
    tm = _tiny_models()
    tok = tm.build_tokenizer()
    return tm.build_tiny_gpt2(tok, n_ctx=256), tok


def record_sample(folder: str, text: str = SAMPLE, name: str = "sample") -> str:
    """Write ``folder/name.prompt`` and record ``folder/name.hxr``; return the trace path."""
    import torch

    torch.set_num_threads(1)
    import hexray

    os.makedirs(folder, exist_ok=True)
    prompt = os.path.join(folder, f"{name}.prompt")
    with open(prompt, "w", encoding="utf-8", newline="") as f:
        f.write(text)
    model, tok = factory()
    return hexray.record(text, model=model, tokenizer=tok, output=os.path.join(folder, f"{name}.hxr"), device="cpu",
                         bundle=True)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python editor/testing/tiny_model.py FOLDER")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    print(record_sample(sys.argv[1]))
