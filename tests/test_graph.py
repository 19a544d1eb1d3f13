"""Attribution graphs from a trace (hexray_core/replay/graph, `hexray graph`).

The reference is TransformerLens itself: the bridge that recorded the trace, run with its own attention patterns
and norm scales frozen (hooked back in from its clean run) and its MLP outputs replaced by the replacement
model's (transcoder reconstruction + error). In that frozen model every edge is an intervention: remove one
source's write and the target moves by exactly the edge's weight. Completeness is checked on every row.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from hexray_core.errors import HexRayError

PROMPT = "The quick brown fox jumps over the lazy dog."
WEIGHTS = ["W_Q", "b_Q", "W_K", "b_K", "W_V", "b_V", "W_O", "b_O", "W_U", "b_U"]


def _weights(bridge) -> dict:
    return {n: getattr(bridge, n).detach().numpy().copy() for n in WEIGHTS}


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def recorded(request, tmp_path_factory):
    """(recorder, trace path, weights) of a float32 trace of PROMPT."""
    rec = request.getfixturevalue(f"tiny_{request.param}_recorder")
    path = tmp_path_factory.mktemp("graph") / f"{request.param}.hxr"
    rec.record(PROMPT, path, act_dtype="f32", lens=False)
    return rec, path, _weights(rec.bridge)


def _frozen_reference(rec, model, remove=None):
    """The bridge with its own clean-run patterns and scales frozen and MLP outputs replaced by recorded ones,
    minus the write of ``remove`` = ("feature", i) | ("error", layer, pos) | ("token", pos). Returns (inputs of
    each layer's transcoder [L, n, d], demeaned logits [n, V])."""
    import torch

    b = rec.bridge
    ids = torch.tensor([model.r.tokens])
    L = model.L
    with torch.no_grad():
        _, cache = b.run_with_cache(ids)
    store = {}
    hooks = []
    for lay in range(L):
        for name in (f"blocks.{lay}.attn.hook_pattern", f"blocks.{lay}.ln1.hook_scale",
                     f"blocks.{lay}.ln2.hook_scale"):
            hooks.append((name, lambda x, hook, v=cache[name]: v.clone()))

        def mlp(x, hook, lay=lay):
            out = torch.tensor(model.mlp_out[lay]).clone()
            if remove and remove[0] == "feature" and model.f_layer[remove[1]] == lay:
                i = remove[1]
                out[model.f_pos[i]] -= torch.tensor(model.f_act[i] * model.decoder(lay, model.f_feat[i:i + 1], lay)[0])
            if remove and remove[0] == "error" and remove[1] == lay:
                out[remove[2]] -= torch.tensor(model.errors[lay][remove[2]])
            return out[None]

        hooks.append((f"blocks.{lay}.hook_mlp_out", mlp))
        hooks.append((f"blocks.{lay}.ln2.hook_normalized",
                      lambda x, hook, lay=lay: store.__setitem__(lay, x.detach()[0].numpy().copy())))
    hooks.append(("ln_final.hook_scale", lambda x, hook: cache["ln_final.hook_scale"].clone()))
    if remove and remove[0] == "token":
        def embed(x, hook):
            x = x.clone()
            x[0, remove[1]] = 0
            return x
        hooks.append(("hook_embed", embed))
    with torch.no_grad():
        logits = b.run_with_hooks(ids, fwd_hooks=hooks)[0].numpy().astype(np.float64)
    return np.stack([store[lay] for lay in range(L)]), logits - logits.mean(-1, keepdims=True)


def _value(model, inputs, logits, graph, i):
    """Target i's value in the reference: a feature's pre-activation or a demeaned logit."""
    from hexray_core.replay.graph import FEATURE

    if graph.kind[i] == FEATURE:
        lay, f = int(graph.layer[i]), int(graph.feature[i])
        return float(model.tc.layers[lay].pre_acts(inputs[lay][graph.pos[i]].astype(np.float64))[f])
    return float(logits[graph.pos[i], graph.feature[i]])


@pytest.mark.parametrize("kind", ["transcoder", "clt"])
def test_completeness_and_values_match_transformer_lens(recorded, kind):
    """Every computed row: value = Σ incoming edges + named constants (float32 rounding); the values themselves
    (feature pre-activations, demeaned logits) are TransformerLens's in the frozen model."""
    import hexray
    from hexray_core.replay.graph import build_graph, random_transcoders

    rec, path, weights = recorded
    with hexray.open(path) as t:
        g = build_graph(t, random_transcoders(t.n_layers, 64, 128, kind=kind, seed=3), weights=weights)
        model = g.model
        assert g.meta["drift"] < 1e-5  # the frozen model rebuilds the recorded residual
        rows = ~np.isnan(g.const)
        assert rows.sum() == g.meta["n_selected_features"] + len(g.logit_nodes) > 20
        sums = np.bincount(g.tgt, weights=g.weight.astype(np.float64), minlength=g.n_nodes)
        scale = np.abs(g.value[rows]).max()
        assert not g.dropped[rows].any()  # every edge kept
        np.testing.assert_allclose(sums[rows] + g.const[rows], g.value[rows], rtol=0, atol=1e-5 * scale)
        inputs, logits = _frozen_reference(rec, model)
        ref = np.array([_value(model, inputs, logits, g, i) for i in np.nonzero(rows)[0]])
        np.testing.assert_allclose(g.value[rows], ref, rtol=0, atol=1e-4 * scale)
        # the logit nodes are the model's top logits covering 95% (at most 10)
        last = logits[-1]
        top = np.argsort(-last)[: len(g.logit_nodes)]
        assert list(g.feature[g.logit_nodes]) == list(top)


def test_capped_graph_keeps_completeness_and_its_largest_edges(recorded):
    """With fewer feature rows (chosen by influence) and fewer edges per row, what is left out is summed per
    row: value = Σ kept edges + dropped + const still holds, and the kept edges are each row's largest."""
    import hexray
    from hexray_core.replay.graph import build_graph, random_transcoders

    _, path, weights = recorded
    with hexray.open(path) as t:
        ts = random_transcoders(t.n_layers, 64, 128, seed=3)
        full = build_graph(t, ts, weights=weights)
        g = build_graph(t, ts, weights=weights, max_feature_nodes=40, max_edges_per_row=25, batch_size=16)
    assert g.meta["n_selected_features"] == 40 < full.meta["n_selected_features"]
    rows = ~np.isnan(g.const)
    assert np.bincount(g.tgt, minlength=g.n_nodes).max() <= 25
    sums = np.bincount(g.tgt, weights=g.weight.astype(np.float64), minlength=g.n_nodes)
    np.testing.assert_allclose(sums[rows] + g.dropped[rows] + g.const[rows], g.value[rows], atol=1e-5)
    # the same logit rows, cut to their 25 largest edges (less those from features given no row)
    present = {g.node_id(i) for i in range(g.n_nodes)}
    for i_full, i in zip(full.logit_nodes, g.logit_nodes, strict=True):
        m = full.tgt == i_full
        top = np.argsort(-np.abs(full.weight[m]), kind="stable")[:25]
        want = {full.node_id(s) for s in full.src[m][top]} & present
        assert {g.node_id(s) for s in g.src[g.tgt == i]} == want
        assert g.row_abs[i] == pytest.approx(full.row_abs[i_full], rel=1e-6)


@pytest.mark.slow
def test_edges_are_interventions_in_the_frozen_model(recorded):
    """Removing one source's write moves each target by that source's edge weight (features, errors, tokens;
    into features and into logits); edges from later positions or layers are absent."""
    import hexray
    from hexray_core.replay.graph import ERROR, FEATURE, TOKEN, build_graph, random_transcoders

    rec, path, weights = recorded
    with hexray.open(path) as t:
        g = build_graph(t, random_transcoders(t.n_layers, 64, 128, seed=5), weights=weights)
    model = g.model
    base_in, base_logits = _frozen_reference(rec, model)
    targets = np.nonzero(~np.isnan(g.const))[0]
    checked = 0
    rng = np.random.default_rng(0)
    for kind in (FEATURE, ERROR, TOKEN):
        srcs = np.nonzero(g.kind == kind)[0]
        for s in rng.choice(srcs, size=min(4, len(srcs)), replace=False):
            lay, p = int(g.layer[s]), int(g.pos[s])
            if kind == FEATURE:
                i = int(np.nonzero((model.f_layer == lay) & (model.f_pos == p) & (model.f_feat == g.feature[s]))[0][0])
                remove = ("feature", i)
            else:
                remove = ("error", lay, p) if kind == ERROR else ("token", p)
            inp, lg = _frozen_reference(rec, model, remove)
            for tgt in targets:
                m = (g.tgt == tgt) & (g.src == s)
                edge = float(g.weight[m][0]) if m.any() else 0.0
                delta = _value(model, base_in, base_logits, g, tgt) - _value(model, inp, lg, g, tgt)
                assert abs(delta - edge) <= 1e-4 * max(1.0, abs(delta)) + 1e-5, (kind, s, tgt, delta, edge)
                if g.pos[tgt] < p or (g.kind[tgt] == FEATURE and g.layer[tgt] <= lay and kind != TOKEN):
                    assert edge == 0.0
                checked += 1
    assert checked > 100


def test_prune_paths_and_neuronpedia_schema(recorded):
    import hexray
    from hexray_core.replay.graph import LOGIT, TOKEN, random_transcoders
    from hexray_core.replay.graph.neuronpedia import validate

    _, path, weights = recorded
    with hexray.open(path) as t:
        full = t.graph(random_transcoders(t.n_layers, 64, 128, seed=1), weights=weights)
    g = full.prune(0.8, 0.98)
    assert 0 < g.n_nodes < full.n_nodes and 0 < g.n_edges < full.n_edges
    assert (g.kind == TOKEN).sum() == (full.kind == TOKEN).sum()  # tokens and logits always kept
    assert (g.kind == LOGIT).sum() == (full.kind == LOGIT).sum()
    assert g.prune(0.8, 0.98, max_nodes=30, max_edges=50).n_edges <= 50
    # pruning keeps a subset of the full graph's edges with the same weights
    full_w = {(full.node_id(a), full.node_id(b)): w for a, b, w in zip(full.tgt, full.src, full.weight, strict=True)}
    for a, b, w in zip(g.tgt, g.src, g.weight, strict=True):
        assert full_w[(g.node_id(a), g.node_id(b))] == w
    paths = g.paths(k=3)
    assert len(paths) == 3 and paths[0][0] >= paths[1][0] >= paths[2][0]
    assert all(p[-1] == g.logit_nodes[0] for _, p in paths)
    doc = g.to_neuronpedia()
    validate(doc)
    assert len(doc["nodes"]) == g.n_nodes and len(doc["links"]) == g.n_edges
    import jsonschema

    with pytest.raises(jsonschema.ValidationError):
        validate({**doc, "nodes": [{"node_id": 1}]})


def _check_qk_json(doc: dict) -> None:
    """A graph JSON with QK tracing: valid Neuronpedia, the split on the target logit's node, every contributor a
    node of the graph or of qk_only_nodes."""
    from hexray_core.replay.graph.neuronpedia import validate

    validate(doc)
    res = [n for n in doc["nodes"] if "qk_tracing_results" in n]
    assert len(res) == 1 and res[0]["feature_type"] == "logit"
    known = {n["node_id"] for n in doc["nodes"]} | set(doc["qk_only_nodes"])
    for q, k, _ in res[0]["qk_tracing_results"]["pair_wise_contributors"]:
        assert q in known and k in known


def test_qk_tracing_splits_the_recorded_score(tiny_gpt2_recorder, tmp_path):
    import hexray
    from hexray_core.replay.graph import random_transcoders
    from hexray_core.replay.graph.qk import attach_qk, qk_trace

    path = tmp_path / "qk.hxr"
    tiny_gpt2_recorder.record(PROMPT, path, act_dtype="f32", lens=False)
    with hexray.open(path) as t:
        g = t.graph(random_transcoders(t.n_layers, 64, 128, seed=1), weights=_weights(tiny_gpt2_recorder.bridge))
        r = qk_trace(g.model, 1, 2, g.position, 3)
        scale = t.meta["attention"]["layers"][1]["scale"]
        assert r["score"] == pytest.approx(r["recorded_score"], rel=1e-4, abs=1e-5)
        pairs = scale * (r["q_edges"].T.astype(np.float64) @ r["k_edges"].astype(np.float64))
        assert pairs.sum() == pytest.approx(r["pair_sum"], rel=1e-6, abs=1e-9)
        assert r["pair_sum"] + r["bias"] == pytest.approx(r["score"], rel=1e-9)
        # the query vector the frozen model builds is the recorded hook_q
        np.testing.assert_allclose(r["q"], t.run(0)["blocks.1.attn.hook_q"][g.position, 2], atol=1e-4)
        pruned = g.prune()
        pruned.model = g.model
        attach_qk(pruned, 2)
        assert len(pruned.qk) == 2
        _check_qk_json(pruned.to_neuronpedia())


def test_qk_tracing_of_a_rotary_gqa_model_splits_the_recorded_score(tiny_llama_recorder, tmp_path):
    """Tiny Llama (rotary, GQA 4/2): for several (layer, head, query, key) the split sums to the recorded score
    (hook_rot_q · hook_rot_k), and each source's query-side and key-side contributions are Hugging Face's own
    rotary (the cos/sin of the model's rotary module, ``apply_rotary_pos_emb`` as the bridge calls it) applied to
    that source's direct effect on the pre-rotation q or k, computed here from the frozen model's backward."""
    import torch
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    import hexray
    from hexray_core.replay.graph import random_transcoders
    from hexray_core.replay.graph.model import Target
    from hexray_core.replay.graph.neuronpedia import validate
    from hexray_core.replay.graph.qk import attach_qk, qk_trace

    rec = tiny_llama_recorder
    path = tmp_path / "qk.hxr"
    rec.record(PROMPT, path, act_dtype="f32", lens=False)
    with hexray.open(path) as t:
        assert t.meta["attention"]["rotary"]["style"] == "half"
        g = t.graph(random_transcoders(t.n_layers, 64, 128, seed=1), weights=_weights(rec.bridge))
        m = g.model
        assert m.rep == 2  # grouped-query attention: heads 2h and 2h + 1 read key head h
        n = m.n
        with torch.no_grad():
            cos, sin = rec.bridge.original_model.model.rotary_emb(torch.zeros(1), torch.arange(n)[None])

        def rotated(edges, pos):  # [dh, n_src] -> HF's rotation of every source's vector at position pos
            v = torch.tensor(edges.T[None, :, None, :], dtype=torch.float64)  # [1, n_src (as heads), 1, dh]
            c, s = cos[:, pos:pos + 1].double(), sin[:, pos:pos + 1].double()
            return apply_rotary_pos_emb(v, v, c, s)[0][0, :, 0].numpy().T

        for lay, head, query, key in [(0, 0, n - 1, 2), (1, 3, n - 1, 5), (1, 1, 7, 7), (0, 2, 5, 0), (1, 2, 20, 11)]:
            r = qk_trace(m, lay, head, query, key)
            scale = t.meta["attention"]["layers"][lay]["scale"]
            assert r["recorded_score"] == pytest.approx(
                scale * float(t.run(0)[f"blocks.{lay}.attn.hook_rot_q"][query, head].astype(np.float64)
                              @ t.run(0)[f"blocks.{lay}.attn.hook_rot_k"][key, head // 2]))
            assert r["score"] == pytest.approx(r["recorded_score"], rel=1e-4, abs=1e-5)
            pairs = scale * (r["q_edges"].T.astype(np.float64) @ r["k_edges"].astype(np.float64))
            assert pairs.sum() == pytest.approx(r["pair_sum"], rel=1e-6, abs=1e-9)
            assert r["pair_sum"] + r["bias"] == pytest.approx(r["score"], rel=1e-9)
            np.testing.assert_allclose(r["q"], t.run(0)[f"blocks.{lay}.attn.hook_rot_q"][query, head], atol=1e-4)
            np.testing.assert_allclose(r["k"], t.run(0)[f"blocks.{lay}.attn.hook_rot_k"][key, head // 2], atol=1e-4)
            # independently: the pre-rotation direct effects, rotated by Hugging Face's rotary
            W_Q, W_K = m.w["W_Q"][lay, head], m.w["W_K"][lay, head // 2]
            eq, _ = m.backward_batched([Target("pre", lay, query, W_Q[:, e] / m.sc1[lay][query]) for e in range(m.dh)])
            ek, _ = m.backward_batched([Target("pre", lay, key, W_K[:, e] / m.sc1[lay][key]) for e in range(m.dh)])
            want_q, want_k = rotated(eq, query), rotated(ek, key)
            assert np.abs(want_q - eq).max() > 1e-3 or query == 0  # the rotation really moves them
            np.testing.assert_allclose(r["q_edges"], want_q, rtol=0, atol=1e-5 * np.abs(want_q).max())
            np.testing.assert_allclose(r["k_edges"], want_k, rtol=0, atol=1e-5 * np.abs(want_k).max())
            np.testing.assert_allclose(r["q_contrib"], scale * (want_q.T @ r["k"]), rtol=0,
                                       atol=1e-5 * np.abs(r["q_contrib"]).max())
        pruned = g.prune()
        pruned.model = m
        attach_qk(pruned, 2)
        assert len(pruned.qk) == 2
        for res in pruned.qk:
            assert res["score"] == pytest.approx(res["recorded_score"], rel=1e-4, abs=1e-5)
        doc = pruned.to_neuronpedia()
        validate(doc)
        res = [nd for nd in doc["nodes"] if "qk_tracing_results" in nd]
        assert len(res) == 1 and res[0]["qk_tracing_results"]["pair_wise_contributors"]


def test_qk_tracing_refuses_a_rotation_it_cannot_rebuild(tiny_llama_recorder, tmp_path):
    """One line naming why: a rotation the recorder refused to write down, a rotary trace from before it was."""
    import hexray
    from hexray_core.replay.graph import random_transcoders
    from hexray_core.replay.graph.qk import qk_trace, qk_unavailable

    path = tmp_path / "t.hxr"
    tiny_llama_recorder.record(PROMPT, path, act_dtype="f32", lens=False)
    with hexray.open(path) as t:
        g = t.graph(random_transcoders(t.n_layers, 64, 128, seed=1), weights=_weights(tiny_llama_recorder.bridge))
        assert qk_unavailable(t) is None
        spec = t.meta["attention"]
        spec["rotary"] = {"refused": "its rotary frequencies differ between layers"}
        with pytest.raises(HexRayError, match="cannot be rebuilt exactly: its rotary frequencies differ") as e:
            qk_trace(g.model, 1, 0, g.position, 1)
        assert "\n" not in str(e.value)
        del spec["rotary"]
        with pytest.raises(HexRayError, match="record it again"):
            qk_trace(g.model, 1, 0, g.position, 1)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "hexray", "graph", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow
def test_cli_graph_and_bad_input(tiny_gpt2_recorder, tmp_path):
    from safetensors.numpy import save_file

    from hexray_core.replay.graph import random_transcoders, save_circuit_tracer
    from hexray_core.replay.graph.neuronpedia import validate

    trace = tmp_path / "t.hxr"
    tiny_gpt2_recorder.record(PROMPT, trace, lens=False)
    bare = tmp_path / "bare.hxr"
    tiny_gpt2_recorder.record(PROMPT, bare, hooks="blocks.*.hook_resid_pre", lens=False)
    wfile = tmp_path / "w.safetensors"
    save_file(_weights(tiny_gpt2_recorder.bridge), str(wfile))
    tc = tmp_path / "tc"
    save_circuit_tracer(random_transcoders(2, 64, 128, seed=1), tc)
    out = tmp_path / "g.json"
    p = _cli(trace, "--transcoders", tc, "-o", out, "--json")  # the kit holds the attention weights
    assert p.returncode == 0, p.stderr
    summary = json.loads(p.stdout)
    doc = json.loads(out.read_text())
    validate(doc)
    assert summary["nodes"] == len(doc["nodes"]) and summary["edges"] == len(doc["links"])
    assert summary["top_paths"] and summary["qk_tracing"]
    ids = {n["node_id"]: n for n in doc["nodes"]}
    for path in summary["top_paths"]:  # every path ends at a logit; labels name the same nodes as the ids
        assert ids[path["path"][-1]]["feature_type"] == "logit" and path["labels"][-1].startswith("logit ")
        for node_id, label in zip(path["path"], path["labels"], strict=True):
            n = ids[node_id]
            want = {"embedding": f"@{n['ctx_idx']}", "mlp reconstruction error": f"MLP L{n['layer']} error@",
                    "logit": "logit "}.get(n["feature_type"], f"L{n['layer']}F")
            assert want in label, (node_id, label)
    p = _cli(trace, "--transcoders", tc, "--weights", wfile, "-o", out, "--target", " the", "--target", "#5")
    assert p.returncode == 0, p.stderr
    assert sorted(n["feature"] for n in json.loads(out.read_text())["nodes"] if n["feature_type"] == "logit") \
        == sorted([5, tiny_gpt2_recorder.tokenize(" the", False)[0]])
    # bad input: one line each, non-zero exit
    other = tmp_path / "tc3"
    save_circuit_tracer(random_transcoders(3, 64, 128, seed=1), other)
    wide = tmp_path / "tcw"
    save_circuit_tracer(random_transcoders(2, 96, 128, seed=1), wide)
    for args, words in [((trace, "--transcoders", other), "another model"),
                        ((trace, "--transcoders", wide), "another model"),
                        ((bare, "--transcoders", tc), "--hooks default,hook_embed"),
                        ((trace, "--transcoders", tc, "--target", "zzqqxx"), "not a token"),
                        ((trace, "--transcoders", tmp_path), "config.yaml")]:
        p = _cli(*args, "--weights", wfile, "-o", out)
        assert p.returncode != 0 and p.stderr.count("\n") == 1 and words in p.stderr, p.stderr


@pytest.mark.slow
def test_cli_graph_of_a_rotary_model_has_qk_tracing(tiny, tiny_llama_recorder, tmp_path):
    """`hexray graph --json` on a tiny Llama trace (rotary, GQA): the summary lists QK tracings whose split sums to the
    recorded score, the JSON stays schema-valid with the top logit's ``qk_tracing_results``, nothing on stderr; a
    rotation that cannot be rebuilt exactly leaves the graph and one warning line naming why."""
    from hexray_core.replay.graph import random_transcoders, save_circuit_tracer
    from hexray_core.replay.graph.neuronpedia import validate

    trace = tmp_path / "llama.hxr"
    tiny_llama_recorder.record(PROMPT, trace, act_dtype="f32", lens=False)
    tc = tmp_path / "tc"
    save_circuit_tracer(random_transcoders(2, 64, 128, seed=1), tc)
    out = tmp_path / "g.json"
    p = _cli(trace, "--transcoders", tc, "-o", out, "--json", "--qk", "3")  # the kit holds the attention weights
    assert p.returncode == 0 and p.stderr == "", p.stderr
    summary = json.loads(p.stdout)
    assert len(summary["qk_tracing"]) == 3
    for r in summary["qk_tracing"]:
        assert r["score"] == pytest.approx(r["recorded_score"], rel=1e-4, abs=1e-5)
    _check_qk_json(json.loads(out.read_text()))
    # a rotation the recorder could not write down exactly: the graph is still written, QK tracing says why
    from hexray_core.record import Recorder

    tok = tiny_llama_recorder.tokenizer
    hf = tiny.build_tiny_llama(tok, rope={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})
    dyn = tmp_path / "dynamic.hxr"
    Recorder(hf, tokenizer=tok).record(PROMPT, dyn, act_dtype="f32", lens=False)
    p = _cli(dyn, "--transcoders", tc, "-o", out, "--json")
    assert p.returncode == 0, p.stderr
    assert p.stderr == ("hexray: warning: no QK tracing: the rotary embedding of this model cannot be rebuilt exactly: "
                        "its rotary frequencies depend on the context length (rope_type dynamic)\n")
    assert json.loads(p.stdout)["qk_tracing"] == []
    validate(json.loads(out.read_text()))


def test_bad_weights_are_one_error(tiny_gpt2_recorder, tmp_path):
    import hexray
    from hexray_core.replay.graph import random_transcoders

    path = tmp_path / "t.hxr"
    tiny_gpt2_recorder.record(PROMPT, path, lens=False)
    w = _weights(tiny_gpt2_recorder.bridge)
    w["W_V"] = w["W_V"][:, :, :32]
    with hexray.open(path) as t, pytest.raises(HexRayError, match="do not fit"):
        t.graph(random_transcoders(2, 64, 16), weights=w)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_raw_space_transcoders_read_the_unprocessed_models_ln2(arch, tiny, tiny_tokenizer, request, tmp_path):
    """Transcoders reading the unprocessed model's ln2 output (``ln2.hook_out``: norm weight and bias included, which
    compatibility mode folded away) get it rebuilt from the trace and raw/ln2.*: Hugging Face's ln_2 output."""
    import torch

    import hexray
    from hexray_core.replay.graph import build_graph, random_transcoders

    rec = request.getfixturevalue(f"tiny_{arch}_recorder")
    hf = (tiny.build_tiny_gpt2 if arch == "gpt2" else tiny.build_tiny_llama)(tiny_tokenizer)  # the unprocessed twin
    norms = [blk.ln_2 for blk in hf.transformer.h] if arch == "gpt2" else \
        [blk.post_attention_layernorm for blk in hf.model.layers]
    weights = _weights(rec.bridge)
    weights["raw/ln2.w"] = np.stack([n.weight.detach().numpy() for n in norms])
    if arch == "gpt2":
        weights["raw/ln2.b"] = np.stack([n.bias.detach().numpy() for n in norms])
    path = tmp_path / "raw.hxr"
    rec.record(PROMPT, path, act_dtype="f32", lens=False)
    seen = {}
    handles = [n.register_forward_hook(lambda mod, i, o, k=k: seen.__setitem__(k, o[0].detach().numpy()))
               for k, n in enumerate(norms)]
    with hexray.open(path) as t, torch.no_grad():
        hf(torch.tensor([t.run(0).tokens]))
        for h in handles:
            h.remove()
        g = build_graph(t, random_transcoders(t.n_layers, 64, 128, seed=2, space="raw", hook_in="ln2.hook_out"),
                        weights=weights)
    m = g.model
    for lay in range(m.L):
        np.testing.assert_allclose(m.tc_input(lay, m.resid_mid[lay]), seen[lay], atol=2e-4)
    rows = ~np.isnan(g.const)
    sums = np.bincount(g.tgt, weights=g.weight.astype(np.float64), minlength=g.n_nodes)
    np.testing.assert_allclose(sums[rows] + g.const[rows], g.value[rows], atol=1e-4)
    # compat-space transcoders would read something else: the spaces really differ
    assert not np.allclose(m.tc_input(0, m.resid_mid[0]), m._centre(m.resid_mid[0]) / m.sc2[0][:, None], atol=1e-2)
