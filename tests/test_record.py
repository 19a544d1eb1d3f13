"""Recording on tiny in-memory GPT-2 and Llama models: tensors, logits, attribution identity, runs."""

from __future__ import annotations

import numpy as np
import pytest

from hexray_core.errors import HexRayError
from hexray_core.record.hooks import DEFAULT_HOOKS, default_attention_hooks, plan_hooks
from trace_format import WEIGHTS_RUN, TraceReader

PROMPT = "Alice and Bob went to the store. Bob gave a drink to"


def cache_of(recorder, ids):
    import torch

    with torch.no_grad():
        logits, cache = recorder.bridge.run_with_cache(torch.tensor([ids]))
    return logits[0].float().numpy(), cache


@pytest.mark.parametrize("hooks", ["default", "full"])
def test_recorded_tensors_equal_run_with_cache(tiny_recorder, tmp_path, hooks):
    # run_with_cache runs TransformerLens's eager attention: record the same way to compare to 1e-6
    # (the default, blockwise attention, is compared with eager in tests/test_flash_attention.py)
    res = tiny_recorder.record([PROMPT, "東京 🍕"], tmp_path / "t.hxr", hooks=hooks, act_dtype="float32",
                               attention="eager")
    with TraceReader(res.path) as r:
        assert len(r.runs) == 2
        for run in r.runs:
            ids = run["tokens"]
            _, cache = cache_of(tiny_recorder, ids)
            names = [n for n in r.names(run["id"]) if not n.startswith("hexray.")]
            assert names
            for name in names:
                got = r.read(name, run["id"])
                want = cache[name][0].float().numpy()
                assert got.shape == want.shape, name
                np.testing.assert_allclose(got, want, rtol=0, atol=1e-6, err_msg=name)
            for alias, target in run["aliases"].items():
                np.testing.assert_array_equal(cache[alias][0].float().numpy(), r.read(target, run["id"]))
    if hooks == "default":
        cfg = tiny_recorder.loaded.model_meta["config"]
        expected = set()
        attention = tiny_recorder.attention_spec()
        assert attention is not None  # GPT-2 and Llama: q and k, not patterns
        for pat in DEFAULT_HOOKS + default_attention_hooks(attention):
            for layer in range(cfg["n_layers"]):
                expected.add(pat.replace("*", str(layer)))
        if cfg["positional_embedding_type"] != "standard":
            expected.discard("hook_pos_embed")  # rotary: no learned positions (ARCHITECTURE.md)
        assert set(names) == expected


@pytest.mark.parametrize("hooks", ["default", "full"])
def test_full_is_a_superset_of_default_and_aliases_are_unique(tiny_recorder, hooks):
    plan = plan_hooks(tiny_recorder.bridge, hooks)
    default = set(plan_hooks(tiny_recorder.bridge, "default").names)
    assert default <= set(plan.names)
    assert len(plan.names) == len(set(plan.names))
    assert "hook_unembed" not in plan.names
    assert "blocks.0.hook_in" not in plan.names and "blocks.0.hook_resid_pre" in plan.names


def test_explicit_and_glob_hooks(tiny_gpt2_recorder, tmp_path):
    res = tiny_gpt2_recorder.record("hello", tmp_path / "t.hxr",
                                    hooks="blocks.0.hook_in,blocks.*.attn.hook_q,blocks.0.attn.hook_result")
    with TraceReader(res.path) as r:
        names = set(r.names(0))
        assert r.meta["hooks"] == {"set": "custom", "requested": ["blocks.0.hook_in", "blocks.*.attn.hook_q",
                                                                  "blocks.0.attn.hook_result"]}
    # an explicit alias is stored under its canonical legacy name; gated hooks are switched on
    assert {"blocks.0.hook_resid_pre", "blocks.0.attn.hook_q", "blocks.1.attn.hook_q",
            "blocks.0.attn.hook_result"} <= names
    assert not tiny_gpt2_recorder.bridge.cfg.use_attn_result  # switched back off afterwards
    with pytest.raises(HexRayError, match="no hook named"):
        plan_hooks(tiny_gpt2_recorder.bridge, "blocks.0.hook_nope")
    with pytest.raises(HexRayError, match="matches no hook"):
        plan_hooks(tiny_gpt2_recorder.bridge, "blocks.9*")


def test_the_lens_reads_residuals_stored_under_another_name(tiny_recorder, tmp_path):
    """resid_post of layer L is the very tensor resid_pre of layer L+1 carries: stored once, as an alias, it must
    still reach the logit lens (a KeyError before)."""
    res = tiny_recorder.record("hello there", tmp_path / "t.hxr", act_dtype="float32", lens=True,
                               hooks="blocks.*.hook_resid_pre,blocks.*.hook_resid_post")
    with TraceReader(res.path) as r:
        assert r.meta["storage"]["lens"]
        assert r.runs[0]["aliases"].get("blocks.1.hook_resid_pre") == "blocks.0.hook_resid_post"
        lens_top1 = r.read("hexray.lens_topk_ids", run=0)[-1, :, 0]  # after the last block: the model's own top-1
        np.testing.assert_array_equal(lens_top1, r.read("hexray.topk_ids", run=0)[:, 0])


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_logits_equal_hf(tiny, tiny_tokenizer, tmp_path, arch):
    """Stored top-k and next-token logits equal the HF model's, computed before the bridge touched it."""
    from hexray_core.record import Recorder

    build = tiny.build_tiny_gpt2 if arch == "gpt2" else tiny.build_tiny_llama
    hf = build(tiny_tokenizer, seed=3)
    ids = [tiny_tokenizer.bos_token_id] + tiny_tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    ref = tiny.hf_logits(hf, ids).numpy()
    rec0 = Recorder(hf, tokenizer=tiny_tokenizer)
    res = rec0.record(PROMPT, tmp_path / "t.hxr", top_k=7)
    with TraceReader(res.path) as r:
        run = r.runs[0]
        assert run["tokens"] == ids
        top_ids = r.read("hexray.topk_ids", 0, dtype="stored")
        top_logits = r.read("hexray.topk_logits", 0)
        nxt = r.read("hexray.next_logit", 0)
        lse = r.read("hexray.logsumexp", 0)
    assert top_ids.shape == (len(ids), 7) and top_ids.dtype == np.int32
    np.testing.assert_allclose(top_logits, np.take_along_axis(ref, top_ids.astype(np.int64), 1), atol=1e-4)
    np.testing.assert_array_equal(top_ids[:, 0], ref.argmax(-1))
    np.testing.assert_allclose(nxt[:-1], ref[np.arange(len(ids) - 1), ids[1:]], atol=1e-4)
    assert np.isnan(nxt[-1])
    np.testing.assert_allclose(lse, np.log(np.exp(ref - ref.max(-1, keepdims=True)).sum(-1)) + ref.max(-1),
                               atol=1e-4)
    assert r.meta["model"]["processing"]["center_unembed"] is False


def test_attribution_identity_from_the_trace_alone(tiny_recorder, tmp_path):
    """Σ_c (c − mean c)/scale · W_U[:, t] + b_U[t] = recorded logit, with what the trace holds (no kit)."""
    res = tiny_recorder.record(PROMPT, tmp_path / "t.hxr", act_dtype="float32", top_k=5)
    with TraceReader(res.path) as r:
        meta, run = r.meta, r.runs[0]
        cfg = meta["model"]["config"]
        rms = cfg["normalization_type"].startswith("RMS")
        comps = [r.read("hook_embed")]
        if r.has("hook_pos_embed"):
            comps.append(r.read("hook_pos_embed"))
        for layer in range(cfg["n_layers"]):
            comps += [r.read(f"blocks.{layer}.hook_attn_out"), r.read(f"blocks.{layer}.hook_mlp_out")]
        scale = r.read("ln_final.hook_scale")
        uids = list(r.read("hexray.unembed_ids", dtype="stored"))
        cols, bias = r.read("hexray.unembed_cols"), r.read("hexray.unembed_bias")
        nxt, top_ids, top_logits = r.read("hexray.next_logit"), r.read("hexray.topk_ids", dtype="stored"), \
            r.read("hexray.topk_logits")
        assert r.info("ln_final.hook_scale").dtype == "f32"
    ids = run["tokens"]
    assert set(ids) | set(top_ids.reshape(-1).tolist()) == set(uids) and uids == sorted(uids)

    def logit(p, t):
        j = uids.index(t)
        return sum(((c[p] if rms else c[p] - c[p].mean()) / scale[p, 0]) @ cols[j] for c in comps) + bias[j]

    for p in range(len(ids) - 1):
        assert logit(p, ids[p + 1]) == pytest.approx(nxt[p], abs=1e-4)
        for k in range(top_ids.shape[1]):
            assert logit(p, int(top_ids[p, k])) == pytest.approx(top_logits[p, k], abs=1e-4)


def test_per_head_split_with_the_bundled_kit(tiny_recorder, tmp_path):
    """attn_out = Σ_h z_h · W_O[h] + b_O and mlp_out = post · W_out + b_out, using the kit's weights."""
    res = tiny_recorder.record(PROMPT, tmp_path / "t.hxr", act_dtype="float32", bundle=True)
    with TraceReader(res.path) as r:
        W_O, b_O = r.read("kit/W_O", WEIGHTS_RUN), r.read("kit/b_O", WEIGHTS_RUN)
        W_out, b_out = r.read("kit/W_out", WEIGHTS_RUN), r.read("kit/b_out", WEIGHTS_RUN)
        for layer in range(r.meta["model"]["config"]["n_layers"]):
            z = r.read(f"blocks.{layer}.attn.hook_z")
            attn = np.einsum("phd,hdm->pm", z, W_O[layer]) + b_O[layer]
            np.testing.assert_allclose(attn, r.read(f"blocks.{layer}.hook_attn_out"), atol=1e-4)
            mlp = r.read(f"blocks.{layer}.mlp.hook_post") @ W_out[layer] + b_out[layer]
            np.testing.assert_allclose(mlp, r.read(f"blocks.{layer}.hook_mlp_out"), atol=1e-4)


def test_meta_and_run_keys(tiny_gpt2_recorder, tmp_path):
    res = tiny_gpt2_recorder.record(["one", "two 🍕", "three"], tmp_path / "t.hxr", hooks="default")
    with TraceReader(res.path) as r:
        meta = r.meta
        assert meta["hexray"]["trace"] == "recording"
        m = meta["model"]
        assert m["source"] == "memory" and m["class"] == "GPT2LMHeadModel" and m["dtype"] == "float32"
        assert set(m["config"]) >= {"n_layers", "d_model", "n_heads", "d_head", "d_mlp", "d_vocab", "n_ctx", "act_fn",
                                    "normalization_type", "positional_embedding_type", "gated_mlp"}
        assert m["processing"] == {"compatibility_mode": True, "fold_ln": True, "center_writing_weights": True,
                                   "center_unembed": False, "fold_value_biases": True}
        assert set(meta["tokenizer"]) >= {"name", "vocab_size", "bos_token_id", "sha256"}
        assert meta["kit"]["bundled"] is False and len(meta["kit"]["sha256"]) == 64
        assert meta["storage"]["act_dtype"] == "f16" and meta["storage"]["codec"] == "zstd:1"
        assert {"hexray", "python", "torch", "transformers", "transformer_lens", "numpy", "device"} <= set(
            meta["writer"])
        assert [run["prompt"] for run in r.runs] == ["one", "two 🍕", "three"]
        for run in r.runs:
            assert run["status"] == "complete"
            assert run["n_prompt_tokens"] == len(run["tokens"]) and run["prepend_bos"] is True
            assert run["generated"] == {"n": 0, "temperature": 0.0, "seed": None}
            assert r.info("blocks.0.hook_resid_post", run["id"]).dtype == "f16"
            assert r.info("blocks.0.attn.hook_q", run["id"]).shape == (len(run["tokens"]), 4, 16)
            assert not r.has("blocks.0.attn.hook_pattern", run["id"])  # recomputed from q and k
            assert run["attention"]["stored_patterns"] == []


def test_streaming_writes_while_the_forward_runs(tiny_gpt2_recorder, tmp_path, monkeypatch):
    """Tensors reach the writer as their hooks fire, not after the forward pass."""
    from trace_format import TraceWriter

    written: list[str] = []
    seen_at_last_layer: list[int] = []
    real_write = TraceWriter.write

    def spy(self, name, array, **kw):
        written.append(name)
        return real_write(self, name, array, **kw)

    monkeypatch.setattr(TraceWriter, "write", spy)
    bridge = tiny_gpt2_recorder.bridge
    hp = bridge.hook_dict["ln_final.hook_scale"]
    hp.add_hook(lambda t, hook: seen_at_last_layer.append(len(written)))
    try:
        tiny_gpt2_recorder.record(PROMPT, tmp_path / "t.hxr")
    finally:
        hp.remove_hooks("fwd")
    n_layers = bridge.cfg.n_layers
    assert seen_at_last_layer and seen_at_last_layer[0] >= 9 * n_layers  # all block tensors already handed over


def test_fp16_overflow_falls_back_and_says_so(tiny, tiny_tokenizer, tmp_path):
    import torch

    from hexray_core.record import Recorder
    from hexray_core.record.capture import to_host

    x, tag, attrs = to_host(torch.tensor([[[1.0, -7e4, 3.0]]]), "f16")
    assert tag == "f32" and attrs["overflow"] == {"wanted": "f16", "absmax": 7e4} and x.dtype == torch.float32
    x, tag, attrs = to_host(torch.tensor([[[1.0, -7e4, 3.0]]]), "f16", overflow="bf16")
    assert tag == "bf16" and x.dtype == torch.bfloat16
    x, tag, attrs = to_host(torch.tensor([[[1.0, -float("inf"), 3.0]]]), "f16")
    assert tag == "f16" and attrs["nonfinite"] == {"nan": False, "posinf": False, "neginf": True}
    x, tag, attrs = to_host(torch.tensor([[[1.0, float("nan"), 7e4, float("inf")]]]), "f16")
    assert tag == "f32" and attrs["nonfinite"] == {"nan": True, "posinf": True, "neginf": False}
    assert attrs["overflow"]["absmax"] == 7e4

    hf = tiny.build_tiny_gpt2(tiny_tokenizer)
    with torch.no_grad():
        hf.transformer.wte.weight.mul_(1e6)  # embeddings far beyond float16's range
    rec = Recorder(hf, tokenizer=tiny_tokenizer)
    res = rec.record("hello", tmp_path / "t.hxr", act_dtype="float16")
    with TraceReader(res.path) as r:
        info = r.info("hook_embed")
        assert info.dtype == "f32" and info.attrs["overflow"]["wanted"] == "f16"
        assert info.attrs["overflow"]["absmax"] > 65504
        assert np.isfinite(r.read("hook_embed")).all()
        assert r.info("blocks.0.hook_attn_out").dtype == "f16"  # LayerNorm brought the rest back in range
        _, cache = cache_of(rec, r.runs[0]["tokens"])
        np.testing.assert_array_equal(r.read("hook_embed"), cache["hook_embed"][0].numpy())


def test_bfloat16_activations(tiny_gpt2_recorder, tmp_path):
    res = tiny_gpt2_recorder.record("hello there", tmp_path / "t.hxr", act_dtype="bfloat16")
    with TraceReader(res.path) as r:
        assert r.meta["storage"]["act_dtype"] == "bf16"
        assert r.info("blocks.0.hook_resid_post").dtype == "bf16"
        _, cache = cache_of(tiny_gpt2_recorder, r.runs[0]["tokens"])
        want = cache["blocks.0.hook_resid_post"][0].numpy()
        np.testing.assert_allclose(r.read("blocks.0.hook_resid_post"), want, rtol=1e-2, atol=1e-2)


def test_generation_marks_tokens(tiny_gpt2_recorder, tmp_path):
    res = tiny_gpt2_recorder.record(["The quick", "Alice"], tmp_path / "t.hxr", generate=4)
    with TraceReader(res.path) as r:
        for run in r.runs:
            n_prompt = run["n_prompt_tokens"]
            prompt_ids = tiny_gpt2_recorder.tokenize(["The quick", "Alice"][run["id"]])
            assert run["tokens"][:n_prompt] == prompt_ids
            assert run["generated"]["n"] == len(run["tokens"]) - n_prompt == 4
            assert run["generated"]["temperature"] == 0.0 and run["generated"]["seed"] is None
            # greedy: each generated token is the argmax of the recorded logits before it
            top = r.read("hexray.topk_ids", run["id"], dtype="stored")
            assert [int(top[p, 0]) for p in range(n_prompt - 1, len(run["tokens"]) - 1)] == run["tokens"][n_prompt:]
            assert run["prompt"].startswith(["The quick", "Alice"][run["id"]])
            assert r.info("blocks.0.hook_resid_post", run["id"]).shape[0] == len(run["tokens"])


def test_sampling_is_reproducible_with_a_seed(tiny_gpt2_recorder, tmp_path):
    kw = dict(generate=6, temperature=1.5, seed=1234)
    a = tiny_gpt2_recorder.record("Bob", tmp_path / "a.hxr", **kw)
    b = tiny_gpt2_recorder.record("Bob", tmp_path / "b.hxr", **kw)
    c = tiny_gpt2_recorder.record("Bob", tmp_path / "c.hxr", generate=6, temperature=1.5)
    with TraceReader(a.path) as ra, TraceReader(b.path) as rb, TraceReader(c.path) as rc:
        assert ra.runs[0]["tokens"] == rb.runs[0]["tokens"]
        assert ra.runs[0]["generated"] == {"n": ra.runs[0]["generated"]["n"], "temperature": 1.5, "seed": 1234}
        assert isinstance(rc.runs[0]["generated"]["seed"], int)  # drawn and recorded


def test_input_errors(tiny_gpt2_recorder, tmp_path):
    rec = tiny_gpt2_recorder
    with pytest.raises(HexRayError, match="empty prompt"):
        rec.record("", tmp_path / "t.hxr")
    with pytest.raises(HexRayError, match="prompt 2 is empty"):
        rec.record(["a", ""], tmp_path / "t.hxr")
    with pytest.raises(HexRayError, match=r"over the model's context of 64 tokens"):
        rec.record("word " * 100, tmp_path / "t.hxr")
    with pytest.raises(HexRayError, match=r"\+ 60 to generate"):
        rec.record("word " * 5, tmp_path / "t.hxr", generate=60)
    with pytest.raises(HexRayError, match="no such folder"):
        rec.record("a", tmp_path / "missing" / "t.hxr")
    with pytest.raises(HexRayError, match="it is a folder"):
        rec.record("a", tmp_path)
    with pytest.raises(HexRayError, match="top_k= must be at least 1"):
        rec.record("a", tmp_path / "t.hxr", top_k=0)
    assert not (tmp_path / "t.hxr").exists()


def test_device_to_host_drain_thread():
    """The CUDA path's drain thread (exercised on CPU with a stand-in event): order, flush, errors."""
    import torch

    from hexray_core.record.capture import _DrainThread

    class Event:
        def synchronize(self):
            pass

    got = []
    drain = _DrainThread(lambda name, arr, dt, attrs: got.append((name, arr.copy(), dt)), max_bytes=64)
    for i in range(20):
        drain.submit(f"t{i}", torch.full((4, 4), float(i)), Event(), "f32", {})
    drain.submit("b", torch.ones(2, dtype=torch.bfloat16), Event(), "bf16", {})
    drain.flush()
    assert [g[0] for g in got] == [f"t{i}" for i in range(20)] + ["b"]
    assert got[3][1][0, 0] == 3.0 and got[-1][2] == "bf16" and got[-1][1].dtype == np.uint16
    drain.close()

    def failing(name, arr, dt, attrs):
        raise OSError(28, "No space left on device")

    drain = _DrainThread(failing)
    drain.submit("x", torch.zeros(3), Event(), "f32", {})
    with pytest.raises(OSError):
        drain.flush()
    with pytest.raises(OSError):
        drain.submit("y", torch.zeros(3), Event(), "f32", {})
    drain.close()


def test_python_facade(tiny, tiny_tokenizer, tmp_path):
    import hexray

    trace = hexray.record(["one", "two"], model=tiny.build_tiny_gpt2(tiny_tokenizer), tokenizer=tiny_tokenizer,
                          output=tmp_path / "t.hxr", top_k=3)  # the opened trace; its file is trace.path
    assert trace.path == str(tmp_path / "t.hxr") and [r.prompt for r in trace] == ["one", "two"]
    with TraceReader(trace.path) as r:
        assert len(r.runs) == 2 and r.info("hexray.topk_ids", 1).shape[1] == 3


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_greedy_generation_equals_hf_generate(tiny, tiny_tokenizer, tmp_path, arch):
    """--generate continues exactly as Hugging Face's own greedy generate (KV cache) on the untouched model.

    (TransformerLens 4.3's bridge.generate with its KV cache does not, in compatibility mode.)"""
    import torch

    from hexray_core.record import Recorder

    build = tiny.build_tiny_gpt2 if arch == "gpt2" else tiny.build_tiny_llama
    hf = build(tiny_tokenizer, seed=7)
    ids = [tiny_tokenizer.bos_token_id] + tiny_tokenizer("The quick", add_special_tokens=False)["input_ids"]
    x = torch.tensor([ids])
    with torch.no_grad():
        ref = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=6, do_sample=False,
                          eos_token_id=None, pad_token_id=None)[0, len(ids):].tolist()
    res = Recorder(hf, tokenizer=tiny_tokenizer).record("The quick", tmp_path / "t.hxr", generate=6)
    with TraceReader(res.path) as r:
        assert r.runs[0]["tokens"] == ids + ref


def test_full_hooks_store_a_tensor_changed_in_place_between_hook_points(tiny, tiny_tokenizer, tmp_path):
    """`blocks.1.ln1.hook_in` carries the very tensor of `blocks.1.hook_resid_pre`, so `--hooks full`
    normally stores it as an alias. A model (here a steering hook, as users write them) that adds to
    that tensor in place between the two hook points must get the changed values stored, not an alias."""
    from hexray_core.record import Recorder

    rec = Recorder(tiny.build_tiny_gpt2(tiny_tokenizer), tokenizer=tiny_tokenizer)  # own model: it gets a hook
    plain = rec.record(PROMPT, tmp_path / "plain.hxr", hooks="full", act_dtype="float32")
    with TraceReader(plain.path) as r:
        assert r.runs[0]["aliases"]["blocks.1.ln1.hook_in"] == "blocks.1.hook_resid_pre"

    def steer(tensor, hook):
        tensor.add_(0.5)  # in place: same storage, same strides, a new version

    hp = rec.bridge.hook_dict["blocks.1.ln1.hook_in"]
    hp.add_hook(steer)  # added before the capture's own hook, so it runs first
    try:
        res = rec.record(PROMPT, tmp_path / "steered.hxr", hooks="full", act_dtype="float32")
    finally:
        hp.remove_hooks()
    with TraceReader(res.path) as r:
        aliases = r.runs[0]["aliases"]
        assert "blocks.1.ln1.hook_in" not in aliases
        assert aliases["blocks.0.ln1.hook_in"] == "blocks.0.hook_resid_pre"  # untouched ones still dedupe
        before, after = r.read("blocks.1.hook_resid_pre"), r.read("blocks.1.ln1.hook_in")
    with TraceReader(plain.path) as r:
        np.testing.assert_allclose(before, r.read("blocks.1.hook_resid_pre"), atol=1e-6)  # the edit came later
    np.testing.assert_allclose(after, before + 0.5, atol=1e-6)
