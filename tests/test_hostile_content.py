"""A trace whose container is intact but whose content is wrong: one clear error, never a traceback.

Each case rewrites a real recording with one field or tensor wrong, then opens it with the Python
API and runs every view (attribution by component/head/neuron, lens, residual, attention, CoT),
`hexray replay` in every mode, and `hexray info`; only `HexRayError`/`TraceFormatError` may come
out, and opening must already name the field or tensor. Hypothesis then generates hostile
metadata and run information at random.
"""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
from hostile_support import every_view, load, record_base, replace_tensor, write
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hexray_core.replay import open_trace
from hexray_core.replay.validate import TraceContentError
from trace_format import WEIGHTS_RUN, TraceFormatError


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile-content")
    path = record_base(folder)
    return folder, path, load(path)


def _cfg(key, value):
    def f(meta, runs, tensors):
        meta["model"]["config"][key] = value
        return meta, runs, tensors
    return f


def _meta(keys, value):
    def f(meta, runs, tensors):
        d = meta
        for k in keys[:-1]:
            d = d[k]
        d[keys[-1]] = value
        return meta, runs, tensors
    return f


def _run(key, value):
    def f(meta, runs, tensors):
        runs[0][key] = value(runs[0]) if callable(value) else value
        return meta, runs, tensors
    return f


def _tensor(name, make, run=0, dtype=None):
    def f(meta, runs, tensors):
        old = next(a for r, n, a, _, _ in tensors if (r, n) == (run, name))
        return meta, runs, replace_tensor(tensors, name, make(old), run=run, dtype=dtype)
    return f


def _add_tensor(name, make, run=0):
    def f(meta, runs, tensors):
        n = len(runs[0]["tokens"])
        arr = make(n)
        return meta, runs, [*tensors, (run, name, arr, "f32" if arr.dtype == np.float32 else "i32", {})]
    return f


def _drop_layer(meta):
    meta["attention"]["layers"] = meta["attention"]["layers"][:-1]
    return meta


def _layer_field(meta, key, value):
    meta["attention"]["layers"][1][key] = value
    return meta


f32 = np.float32
CASES = [
    # metadata: sections that are not maps, sizes of the wrong type or range or disagreeing with the tensors
    ("model-not-map", _meta(["model"], "gpt2"), "meta.model"),
    ("model-null", _meta(["model"], None), "meta.model"),
    ("config-list", _meta(["model", "config"], [1, 2]), "meta.model.config"),
    ("n_layers-str", _cfg("n_layers", "4"), "n_layers"),
    ("n_layers-null", _cfg("n_layers", None), "n_layers"),
    ("n_layers-zero", _cfg("n_layers", 0), "n_layers"),
    ("n_layers-negative", _cfg("n_layers", -1), "n_layers"),
    ("n_layers-u64max", _cfg("n_layers", 2**64 - 1), "n_layers"),
    ("n_layers-float", _cfg("n_layers", 4.0), "n_layers"),
    ("n_layers-too-few", _cfg("n_layers", 2), "n_layers"),
    ("n_layers-too-many", _cfg("n_layers", 7), "n_layers"),
    ("d_model-str", _cfg("d_model", "128"), "d_model"),
    ("d_model-wrong", _cfg("d_model", 64), "d_model"),
    ("n_heads-zero", _cfg("n_heads", 0), "n_heads"),
    ("n_heads-wrong", _cfg("n_heads", 3), "n_heads"),
    ("d_head-wrong", _cfg("d_head", 16), "d_head"),
    ("d_mlp-wrong", _cfg("d_mlp", 100), "d_mlp"),
    ("d_vocab-zero", _cfg("d_vocab", 0), "d_vocab"),
    ("eps-str", _cfg("eps", "1e-5"), "eps"),
    ("eps-nan", _cfg("eps", float("nan")), "eps"),
    ("n_kv-str", _cfg("n_key_value_heads", "4"), "n_key_value_heads"),
    ("norm-type-int", _cfg("normalization_type", 5), "normalization_type"),
    ("model-name-list", _meta(["model", "name"], ["x"]), "meta.model.name"),
    ("kit-str", _meta(["kit"], "abc"), "meta.kit"),
    ("kit-sha-int", _meta(["kit", "sha256"], 5), "sha256"),
    ("kit-sha-path", _meta(["kit", "sha256"], "../../etc/passwd"), "sha256"),
    ("hooks-list", _meta(["hooks"], []), "meta.hooks"),
    ("hooks-set-int", _meta(["hooks", "set"], 3), "hooks.set"),
    ("storage-int", _meta(["storage"], 1), "meta.storage"),
    ("vocab-str", _meta(["vocab"], "abc"), "meta.vocab"),
    ("vocab-ints", _meta(["vocab"], [1, 2, 3]), "meta.vocab"),
    # run information
    ("tokens-str", _run("tokens", "abc"), "tokens"),
    ("tokens-float", _run("tokens", lambda r: [t + 0.5 for t in r["tokens"]]), "tokens"),
    ("tokens-negative", _run("tokens", lambda r: [-1] + r["tokens"][1:]), "tokens"),
    ("tokens-beyond-vocab", _run("tokens", lambda r: [10**9] + r["tokens"][1:]), "tokens"),
    ("tokens-short", _run("tokens", lambda r: r["tokens"][:-1]), "run 0"),
    ("tokens-long", _run("tokens", lambda r: r["tokens"] + [1]), "run 0"),
    ("token_strs-null", _run("token_strs", None), "token_strs"),
    ("token_strs-short", _run("token_strs", lambda r: r["token_strs"][:-1]), "token_strs"),
    ("token_strs-ints", _run("token_strs", lambda r: list(range(len(r["tokens"])))), "token_strs"),
    ("char_spans-short", _run("char_spans", lambda r: r["char_spans"][:-1]), "char_spans"),
    ("char_spans-singletons", _run("char_spans", lambda r: [[1]] * len(r["tokens"])), "char_spans"),
    ("byte_spans-str", _run("byte_spans", lambda r: [["a", "b"]] * len(r["tokens"])), "byte_spans"),
    ("n_prompt-negative", _run("n_prompt_tokens", -1), "n_prompt_tokens"),
    ("n_prompt-str", _run("n_prompt_tokens", "3"), "n_prompt_tokens"),
    ("aliases-list", _run("aliases", []), "aliases"),
    ("aliases-int-values", _run("aliases", {"a": 3}), "aliases"),
    ("unembed_strs-short", _run("unembed_strs", lambda r: r["unembed_strs"][:-1]), "hexray.unembed_ids"),
    ("prompt-int", _run("prompt", 5), "prompt"),
    ("prepend_bos-str", _run("prepend_bos", "yes"), "prepend_bos"),
    # tensors of the wrong shape or dtype
    ("embed-rows", _tensor("hook_embed", lambda a: a[:-1]), "hook_embed"),
    ("topk-1d", _tensor("hexray.topk_ids", lambda a: a[:, 0].copy()), "hexray.topk_ids"),
    ("topk-float", _tensor("hexray.topk_ids", lambda a: a.astype(f32)), "hexray.topk_ids"),
    ("topk-empty-k", _tensor("hexray.topk_ids", lambda a: a[:, :0].copy()), "hexray.topk_ids"),
    ("scale-empty", _tensor("ln_final.hook_scale", lambda a: np.zeros((0,), f32)), "ln_final.hook_scale"),
    ("scale-0d", _tensor("ln_final.hook_scale", lambda a: np.float32(1.0).reshape(())), "ln_final.hook_scale"),
    ("scale-rows", _tensor("ln_final.hook_scale", lambda a: np.ones((3, 1), f32)), "ln_final.hook_scale"),
    ("unembed-width", _tensor("hexray.unembed_cols", lambda a: a[:, :-1].copy()), "hexray.unembed_cols"),
    ("unembed-bias-short", _tensor("hexray.unembed_bias", lambda a: a[:-1].copy()), "hexray.unembed_bias"),
    ("pattern-shape", _add_tensor("blocks.1.attn.hook_pattern", lambda n: np.zeros((4, n, n - 1), f32)),
     "blocks.1.attn.hook_pattern"),
    ("pattern-heads", _add_tensor("blocks.0.attn.hook_pattern", lambda n: np.zeros((3, n, n), f32)),
     "blocks.0.attn.hook_pattern"),
    ("q-heads", _tensor("blocks.0.attn.hook_q", lambda a: a[:, :-1].copy()), "blocks.0.attn.hook_q"),
    ("k-width", _tensor("blocks.2.attn.hook_k", lambda a: a[:, :, :-1].copy()), "blocks.2.attn.hook_k"),
    ("v-rows", _tensor("blocks.3.attn.hook_v", lambda a: a[:-1].copy()), "blocks.3.attn.hook_v"),
    # attention stored as q/k: the recipe in meta.attention
    ("attention-list", _meta(["attention"], []), "meta.attention"),
    ("attention-q-format-bomb", _meta(["attention", "q"], "blocks.{layer:>999999999}.attn.hook_q"), "attention.q"),
    ("attention-k-no-layer", _meta(["attention", "k"], "hook_embed"), "attention.k"),
    ("attention-layers-short", lambda m, r, t: (_drop_layer(m), r, t), "attention.layers"),
    ("attention-scale-str", lambda m, r, t: (_layer_field(m, "scale", "x"), r, t), "attention.layers"),
    ("attention-softcap-negative", lambda m, r, t: (_layer_field(m, "softcap", -1.0), r, t), "attention.layers"),
    ("attention-window-zero", lambda m, r, t: (_layer_field(m, "window", 0), r, t), "attention.layers"),
    ("attention-n_heads-mismatch", _meta(["attention", "n_heads"], 8), "attention.n_heads"),
    ("attention-rotary-style", _meta(["attention", "rotary"], {"style": "spiral", "dim": 2, "inv_freq": [1.0],
                                                               "scale": 1.0, "dtype": "f32"}), "attention.rotary"),
    ("attention-rotary-nan", _meta(["attention", "rotary"], {"style": "half", "dim": 2, "inv_freq": [math.nan],
                                                             "scale": 1.0, "dtype": "f32"}), "attention.rotary"),
    ("lens-layers", _tensor("hexray.lens_topk_ids", lambda a: a[:-1].copy()), "hexray.lens_topk_ids"),
    ("lens-lse-1d", _tensor("hexray.lens_logsumexp", lambda a: a[0].copy()), "hexray.lens_logsumexp"),
    ("lens-rank-float", _tensor("hexray.lens_top_rank", lambda a: a.astype(f32)), "hexray.lens_top_rank"),
    ("z-heads", _tensor("blocks.0.attn.hook_z", lambda a: a[:, :-1].copy()), "blocks.0.attn.hook_z"),
    ("mlp-width", _tensor("blocks.2.mlp.hook_post", lambda a: a[:, :-1].copy()), "blocks.2.mlp.hook_post"),
    ("resid-int", _tensor("blocks.0.hook_resid_post", lambda a: a.astype(np.int32)), "blocks.0.hook_resid_post"),
    ("layer-beyond", _add_tensor("blocks.9.hook_resid_post", lambda n: np.zeros((n, 128), f32)), "layer 9"),
    ("kit-W_U-rows", _tensor("kit/W_U", lambda a: a[:-1].copy(), run=WEIGHTS_RUN), "W_U"),
    ("kit-W_O-layers", _tensor("kit/W_O", lambda a: a[:-1].copy(), run=WEIGHTS_RUN), "W_O"),
    ("kit-b_U-short", _tensor("kit/b_U", lambda a: a[:-1].copy(), run=WEIGHTS_RUN), "b_U"),
    # what fold_value_biases took out of hook_z, per query head (hook_z dictionaries add it back)
    ("kit-raw-b_V-heads", _tensor("kit/raw/b_V", lambda a: a[:, :1].copy(), run=WEIGHTS_RUN), "raw/b_V"),
    ("kit-raw-ln1-W_V", _tensor("kit/raw/ln1.b.W_V", lambda a: a[..., :-1].copy(), run=WEIGHTS_RUN), "raw/ln1.b.W_V"),
]


@pytest.mark.parametrize("case, mutate, expect", CASES, ids=[c[0] for c in CASES])
def test_bad_content_is_one_error_naming_it(base, case, mutate, expect, capsys):
    folder, _path, (meta, runs, tensors) = base
    meta, runs, tensors = mutate(copy.deepcopy(meta), copy.deepcopy(runs), list(tensors))
    path = write(str(folder / f"{case}.hxr"), meta, runs, tensors)
    with pytest.raises(TraceContentError) as err:
        open_trace(path)
    msg = str(err.value)
    assert expect in msg and "\n" not in msg, msg
    assert isinstance(err.value, TraceFormatError)
    assert every_view(path) == [msg]  # the views never get a trace the contract refuses
    # the command line: one line and exit 1 for every replay mode; info describes any valid container
    for mode in ([], ["--lens"], ["--attention"], ["--resid"], ["--cot"]):
        rc, out, err = _cli(capsys, "replay", path, *mode)
        assert rc == 1 and err.count("\n") == 1 and expect in err, err
    rc, out, err = _cli(capsys, "info", path)
    assert rc == 0, err
    rc, out, err = _cli(capsys, "info", path, "--json", "--tensors")
    assert rc == 0 and json.loads(out)["runs"], err


def _cli(capsys, *args):
    from hexray.cli.main import main

    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_the_base_recording_passes_every_view(base):
    _folder, path, _ = base
    assert every_view(path) == []


def test_pattern_recordings_still_validate(base):
    """Traces recorded before attention was stored as q/k hold patterns [n_heads, n, n] and no
    meta.attention; they validate and replay as before."""
    folder, _path, (meta, runs, tensors) = base
    n = len(runs[0]["tokens"])
    with open_trace(_path) as t:  # the real patterns, recomputed from q/k
        patterns = {layer: np.stack([_rows(t, layer, q) for q in range(n)], axis=1) for layer in range(4)}
    old_meta = {k: v for k, v in meta.items() if k != "attention"}
    old = [x for x in tensors if x[1].split(".")[-1] not in ("hook_q", "hook_k", "hook_v")]
    old += [(0, f"blocks.{layer}.attn.hook_pattern", patterns[layer][:, :, 0, :].astype(np.float16), "f16", {})
            for layer in range(4)]
    path = write(str(folder / "patterns.hxr"), old_meta, runs, old)
    assert every_view(path) == []
    with open_trace(path) as t, open_trace(_path) as ref:
        a, b = t.attention(), ref.attention()
        assert [h.label for h in a.heads[:3]] == [h.label for h in b.heads[:3]]
    bad = [*old[:-1], (0, "blocks.3.attn.hook_pattern", np.zeros((4, n, n + 1), np.float16), "f16", {})]
    with pytest.raises(TraceContentError, match="hook_pattern"):
        open_trace(write(str(folder / "patterns-bad.hxr"), old_meta, runs, bad))


def _rows(trace, layer, q):
    from hexray_core.replay.attention import attention_rows

    return attention_rows(trace, 0, layer, [q])


def test_a_trace_without_hexray_metadata_still_opens(base):
    """Every key is optional: a trace_format file with runs but none of the recorder's keys opens."""
    folder, _path, (meta, runs, tensors) = base
    bare_runs = [{"id": r["id"], "tokens": r["tokens"]} for r in runs]
    path = write(str(folder / "bare.hxr"), {}, bare_runs, [t for t in tensors if t[0] != WEIGHTS_RUN])
    errors = every_view(path)
    assert all("\n" not in e for e in errors)
    with open_trace(path) as t:
        assert t.n_layers == 4 and t.runs[0].n_tokens == len(runs[0]["tokens"])


# -- hypothesis: hostile metadata and run information --------------------------------------------

scalar = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**63), max_value=2**64 - 1),
                   st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8), st.binary(max_size=8))
value = st.recursive(scalar, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                     st.dictionaries(st.text(max_size=6), inner, max_size=4)),
                     max_leaves=12)
META_KEYS = ["model", "tokenizer", "kit", "hooks", "storage", "vocab", "hexray"]
CONFIG_KEYS = ["n_layers", "d_model", "n_heads", "d_head", "d_mlp", "d_vocab", "eps", "n_key_value_heads",
               "normalization_type"]
RUN_KEYS = ["tokens", "token_strs", "char_spans", "byte_spans", "n_prompt_tokens", "aliases", "unembed_strs",
            "prompt", "prepend_bos", "generated"]


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(where=st.sampled_from(["meta", "config", "run"]), data=st.data())
def test_hypothesis_hostile_metadata(base, tmp_path_factory, where, data):
    folder, _path, (meta, runs, tensors) = base
    meta, runs = copy.deepcopy(meta), copy.deepcopy(runs)
    for _ in range(data.draw(st.integers(1, 3))):
        if where == "meta":
            meta[data.draw(st.sampled_from(META_KEYS))] = data.draw(value)
        elif where == "config":
            meta["model"]["config"][data.draw(st.sampled_from(CONFIG_KEYS))] = data.draw(value)
        else:
            runs[0][data.draw(st.sampled_from(RUN_KEYS))] = data.draw(value)
    path = write(str(tmp_path_factory.mktemp("hyp") / "t.hxr"), meta, runs, tensors)
    for msg in every_view(path):  # nothing but one-line user errors
        assert "\n" not in msg
    from hexray.cli.info_cmd import render, summarise
    from trace_format import TraceReader

    with TraceReader(path) as r:
        summary = summarise(r, tensors=True)
    json.dumps(summary, ensure_ascii=False, default=repr)
    render(summary)  # whatever the metadata says, info prints it (literally) without an exception


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_hypothesis_odd_but_well_typed_run_info(base, tmp_path_factory, data):
    """Values the contract allows (the views must cope): spans anywhere, any prompt text, any token ids
    in the vocabulary, any n_prompt_tokens, odd token strings, eps at its bounds."""
    folder, _path, (meta, runs, tensors) = base
    meta, runs = copy.deepcopy(meta), copy.deepcopy(runs)
    run = runs[0]
    n = len(run["tokens"])
    text = st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=12)
    pair = st.lists(st.integers(-5, 300), min_size=2, max_size=2)
    run["prompt"] = data.draw(text)
    run["tokens"] = data.draw(st.lists(st.integers(0, 4095), min_size=n, max_size=n))
    run["token_strs"] = data.draw(st.lists(text, min_size=n, max_size=n))
    run["char_spans"] = data.draw(st.lists(pair, min_size=n, max_size=n))
    run["byte_spans"] = data.draw(st.lists(pair, min_size=n, max_size=n))
    run["n_prompt_tokens"] = data.draw(st.integers(0, n))
    run["unembed_strs"] = data.draw(st.lists(text, min_size=len(run["unembed_strs"]),
                                             max_size=len(run["unembed_strs"])))
    meta["model"]["config"]["eps"] = data.draw(st.sampled_from([0.0, 1e-30, 1.0, 1e-5]))
    path = write(str(tmp_path_factory.mktemp("hyp-odd") / "t.hxr"), meta, runs, tensors)
    for msg in every_view(path):
        assert "\n" not in msg
    from hexray_lsp.trace_view import TraceUnreadable, build_view

    try:  # the language server's precomputation of hovers and hints copes too
        build_view(path).close()
    except TraceUnreadable:
        pass
