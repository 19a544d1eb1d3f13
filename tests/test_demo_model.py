"""The embedded demo model: loads offline by name, predicts what its model card says, records."""

from __future__ import annotations

import os
import re

import pytest

from hexray_core.replay import open_trace

DEMO = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "hexray_core", "models",
                    "hexray-demo")


@pytest.fixture(scope="module")
def demo_recorder(tiny):  # `tiny` imports torch once and sets one thread
    from hexray_core.record import Recorder

    return Recorder("hexray-demo", device="cpu")


def card_probe(prompt: str) -> list[tuple[str, float]]:
    """The model card's table row for a prompt: [(token, probability), ...]."""
    card = open(os.path.join(DEMO, "MODEL_CARD.md"), encoding="utf-8").read()
    for line in card.splitlines():
        if line.startswith(f"| `{prompt}` |"):
            return [(t, float(p) / 100) for t, p in re.findall(r"`([^`]*)` ([\d.]+)%", line.split("|")[2])]
    raise AssertionError(f"no probe row for {prompt!r} in MODEL_CARD.md")


def test_files_are_small_and_complete():
    sizes = {f: os.path.getsize(os.path.join(DEMO, f)) for f in os.listdir(DEMO)}
    for needed in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "MODEL_CARD.md"):
        assert needed in sizes
    assert sum(sizes.values()) <= 25_000_000


def test_loads_offline_by_name_and_predicts_as_the_card_says(demo_recorder, tmp_path):
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert demo_recorder.loaded.model_meta["source"] == "embedded"
    for prompt in ("He spoke with the greatest kindness, and the rest of", "Lady Catherine de"):
        path = demo_recorder.record(prompt, tmp_path / "probe.hxr", act_dtype="float32").path
        trace = open_trace(path)
        run = trace.runs[0]
        assert run.tokens[0] == 0  # BOS (<|endoftext|>) first, as the card's probes
        lse = trace.tensor("hexray.logsumexp")[-1]
        ids = trace.tensor("hexray.topk_ids")[-1][:3]
        probs = [float(__import__("math").exp(v - lse)) for v in trace.tensor("hexray.topk_logits")[-1][:3]]
        got = [(trace.token_str(int(i)), p) for i, p in zip(ids, probs, strict=True)]
        want = card_probe(prompt)
        assert [t for t, _ in got] == [t for t, _ in want]
        for (_, p), (_, q) in zip(got, want, strict=True):
            assert p == pytest.approx(q, abs=0.001)
        a = trace.attribution(-1)
        assert a.error < 1e-4 and a.target == want[0][0]


def test_records_a_trace_that_replays(demo_recorder, tmp_path):
    path = demo_recorder.record('"I am very glad to see you," said Emma.', tmp_path / "t.hxr").path
    trace = open_trace(path)
    assert trace.meta["model"]["name"] == "hexray-demo"
    assert trace.n_layers == 4
    said = trace.token_id(" said")
    pos = trace.runs[0].tokens.index(said) - 1
    a = trace.attribution(pos, target="next")
    assert a.target == " said" and a.probability > 0.3


def test_embedded_dictionaries_read_a_demo_trace(demo_recorder, tmp_path):
    """The demo SAE and transcoders ship with the package, small, with their model cards, and read a demo trace:
    attribution by feature stays complete, and the card's L0 is what a held-out-like prompt shows."""
    import hexray

    models = os.path.dirname(DEMO)
    for name in ("hexray-demo-sae", "hexray-demo-transcoders"):
        files = os.listdir(os.path.join(models, name))
        assert "MODEL_CARD.md" in files
        assert sum(os.path.getsize(os.path.join(models, name, f)) for f in files) <= 5_000_000
    sae, tcs = hexray.load_dictionary("hexray-demo-sae"), hexray.load_dictionary("hexray-demo-transcoders")
    assert sae.kind == "sae" and list(sae.layers) == [2] and sae[2].k == 16
    assert tcs.kind == "transcoder" and sorted(tcs.layers) == [0, 1, 2, 3]
    path = demo_recorder.record("It is a truth universally acknowledged, that a single man in possession",
                                tmp_path / "t.hxr", act_dtype="float32").path
    trace = open_trace(path)
    for d in (sae, tcs):
        a = trace.attribution(-1, by="feature", dictionary=d)
        assert a.error < 1e-4 and any(c.kind == "feature" for c in a.contributions)
    l0 = trace[0].features(sae, 2).l0()[1:]
    assert (l0 <= 16).all() and l0.mean() > 8  # TopK: at most k, fewer only where fewer pre-activations are positive
