"""An attribution graph file (Neuronpedia's graph JSON: `hexray graph`, circuit-tracer) as the viewer's graph tab
shows it (viewer/src/graph.ts).

A graph is recognised by content, not by name: a file whose first byte (after white space) is ``{`` is a graph,
anything else is left to the trace reader. Reading is bounded (``MAX_GRAPH_BYTES``, ``MAX_NODES``,
``MAX_LINKS``) and every way a file can be wrong is one ``HexRayError`` naming the file and the field, so a
hostile file costs at most the limit and one line.

What the page gets (``load``): nodes with their grid place (``row``: 0 for embeddings, layer + 1 for features and
errors, the logits' layer + 1 at the top), the label HexRay's other views use (``L0F119@24``), links as three
parallel arrays of node indices and weights (compact, and the page draws 10k edges from them without a
lookup), ``hexray graph``'s per-feature extras (top logits, top contexts) and its QK tracing.
"""

from __future__ import annotations

import json
import math
import os
import re

from hexray_core.errors import HexRayError, json_problem, one_line
from hexray_core.replay.tokentext import quote

# A 64-token graph pruned as circuit-tracer does is a few MB (100k edges and 5k nodes: 8.7 MB), its unpruned one
# 1.7 GB. Parsed, JSON costs Python 10-26x its bytes, so the file and what it holds are counted before parsing:
MAX_GRAPH_BYTES = 32 << 20
MAX_NODES = 200_000
MAX_LINKS = 500_000
MAX_CONTAINERS = 1_000_000  # objects and arrays: an empty one costs ~80 bytes for its 3 ("{},")
MAX_SEPARATORS = 3_000_000  # commas, ~ values: 64 MiB of '"a",' parsed to 1.1 GB of strings; a link holds 3
MAX_TEXT = 10_000  # characters of a prompt token, clerp, id shown (longer ones are cut)

KINDS = {"cross layer transcoder": "feature", "transcoder": "feature", "mlp reconstruction error": "error",
         "embedding": "token", "logit": "logit"}


def is_graph(path: str) -> bool:
    """Whether ``path`` holds JSON (a graph) rather than a trace: its first non-blank byte is ``{``. A path that
    cannot be read is not a graph (the trace reader says why, in its words)."""
    from trace_format import open_regular

    try:
        fd = open_regular(path, what="a trace or a graph JSON")
    except Exception:
        return False
    with os.fdopen(fd, "rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return head.startswith(b"{")


def read(path: str, limit: int = MAX_GRAPH_BYTES) -> dict:
    """The file's JSON object, read within ``limit`` bytes."""
    from trace_format import TraceFormatError, open_regular

    name = one_line(path)
    try:
        fd = open_regular(path, what="a graph JSON")
    except TraceFormatError as e:
        raise HexRayError(str(e)) from None
    with os.fdopen(fd, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise HexRayError(f"{name}: over {limit:,} bytes, more than a graph the viewer opens (prune it: hexray graph "
                          "--max-edges N, or circuit-tracer's node and edge thresholds)")
    # (brackets and commas inside strings count too: a safe over-count)
    for what, count, limit in (("JSON objects and arrays", data.count(b"{") + data.count(b"["), MAX_CONTAINERS),
                               ("JSON values", data.count(b","), MAX_SEPARATORS)):
        if count > limit:
            raise HexRayError(f"{name}: {count:,} {what}, more than a graph the viewer opens holds ({limit:,})")
    try:
        doc = json.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise HexRayError(f"{name}: not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise HexRayError(f"{name}: not JSON ({json_problem(e)})") from None
    except ValueError as e:  # an integer longer than Python parses (sys.get_int_max_str_digits)
        m = re.search(r"value has (\d+) digits", str(e))
        raise HexRayError(f"{name}: not JSON ({f'an integer of {int(m.group(1)):,} digits' if m else one_line(str(e))})"
                          ) from None
    except RecursionError:
        raise HexRayError(f"{name}: JSON nested too deeply") from None
    if not isinstance(doc, dict):
        raise HexRayError(f"{name}: not a graph JSON (expected an object with metadata, nodes and links)")
    return doc


class _Bad(Exception):
    pass


def _finite(v) -> bool:
    """Whether a JSON number is one a float holds: not NaN or infinite, nor an integer past 1.8e308."""
    try:
        return math.isfinite(v)
    except OverflowError:
        return False


def _get(obj: dict, key: str, types, where: str, optional: bool = False):
    v = obj.get(key)
    if v is None and optional:
        return None
    if not isinstance(v, types) or isinstance(v, bool):  # (a bool is an int to isinstance; no field is one)
        want = getattr(types, "__name__", None) or "number"
        raise _Bad(f"{where}.{key}: expected {want}, not {type(v).__name__ if v is not None else 'nothing'}")
    if isinstance(v, int | float) and types is not int and not _finite(v):
        raise _Bad(f"{where}.{key}: not a finite number")
    return v


def _text(v, n: int = MAX_TEXT) -> str:
    return v if len(v) <= n else v[:n] + "…"


def _row(layer, where: str) -> int:
    """Grid row: embeddings 0, layer L at L + 1 (Neuronpedia writes layers as strings; logits are n_layers + 1)."""
    if layer in ("E", "e"):
        return 0
    try:
        lay = int(layer)
    except (TypeError, ValueError):
        raise _Bad(f"{where}.layer: expected 'E' or a layer number, not {str(layer)[:40]!r}") from None
    if not -1 <= lay < 100_000:
        raise _Bad(f"{where}.layer: {lay} is out of range")
    return lay + 1


def _label(kind: str, node_id: str, layer, pos: int, feature, tokens: list[str], clerp: str) -> str:
    """HexRay's names: ``L3F120@5``, ``MLP L3 error@5``, ``" the"@5``, ``logit " Paris"`` (graph.py ``label``)."""
    if kind == "feature":
        parts = node_id.split("_")  # circuit-tracer's "{layer}_{index}_{pos}"; ``feature`` is a Cantor pairing
        index = parts[1] if len(parts) == 3 and parts[1].isdigit() else str(feature)
        return f"L{layer}F{index}@{pos}"
    if kind == "error":
        return f"MLP L{layer} error@{pos}"
    if kind == "token":
        return f"{quote(tokens[pos]) if 0 <= pos < len(tokens) else node_id}@{pos}"
    if kind == "logit":
        if clerp.startswith('Output "') and '"' in clerp[8:]:
            # the clerp holds the token as hexray's token_str shows it (byte escapes already written out)
            return "logit " + quote(clerp[8:clerp.rindex('"')], literal_byte_escapes=True)
        return f"logit #{feature}"
    return _text(clerp or node_id, 80)


def _qk(res, where: str) -> dict:
    out = {}
    for key, width in (("pair_wise_contributors", 3), ("top_q_marginal_contributors", 2),
                       ("top_k_marginal_contributors", 2)):
        rows = res.get(key) if isinstance(res, dict) else None
        if not isinstance(rows, list) or len(rows) > 10_000:
            raise _Bad(f"{where}.{key}: expected a list")
        for j, r in enumerate(rows):
            ok = isinstance(r, list) and len(r) == width and all(isinstance(x, str) for x in r[:-1]) \
                and isinstance(r[-1], int | float) and not isinstance(r[-1], bool) and _finite(r[-1])
            if not ok:
                raise _Bad(f"{where}.{key}[{j}]: expected {width - 1} node ids and a number")
        out[key] = [[_text(x, 200) if isinstance(x, str) else x for x in r] for r in rows]
    return out


def _feature_extra(v, where: str) -> dict:
    """``hexray graph``'s per-feature extras: top/bottom logits [[id, text, value]], top contexts (hexray features)."""
    if not isinstance(v, dict):
        raise _Bad(f"{where}: expected an object")
    out: dict = {}
    for key in ("top_logits", "bottom_logits"):
        rows = v.get(key, [])
        if not isinstance(rows, list) or len(rows) > 1000 or not all(
                isinstance(r, list) and len(r) == 3 and isinstance(r[0], int) and isinstance(r[1], str)
                and isinstance(r[2], int | float) and _finite(r[2]) for r in rows):
            raise _Bad(f"{where}.{key}: expected [[token id, text, value], ...]")
        out[key] = rows
    ctx = v.get("top_contexts", [])
    if not isinstance(ctx, list) or len(ctx) > 1000:
        raise _Bad(f"{where}.top_contexts: expected a list")
    good = []
    for j, c in enumerate(ctx):
        ok = isinstance(c, dict) and isinstance(c.get("tokens"), list) and len(c["tokens"]) <= 1000 \
            and all(isinstance(t, str) for t in c["tokens"]) and isinstance(c.get("activation"), int | float) \
            and isinstance(c.get("position"), int) and isinstance(c.get("start"), int)
        if not ok:
            raise _Bad(f"{where}.top_contexts[{j}]: expected tokens, activation, position, start")
        acts = c.get("activations")
        acts = acts if isinstance(acts, list) and len(acts) == len(c["tokens"]) and all(
            isinstance(a, int | float) and not isinstance(a, bool) and _finite(a) for a in acts) else None
        good.append({"tokens": [_text(t, 200) for t in c["tokens"]], "activation": c["activation"],
                     "position": c["position"], "start": c["start"], "id": str(c.get("id", ""))[:200],
                     "activations": acts})
    out["top_contexts"] = good
    for key in ("density", "dataset"):
        if isinstance(v.get(key), int | float | str) and not isinstance(v.get(key), bool):
            out[key] = v[key]
    return out


def convert(doc: dict, name: str) -> dict:
    """The page's graph from a parsed graph JSON (raises ``_Bad`` naming the field that is wrong)."""
    meta = _get(doc, "metadata", dict, "graph")
    tokens = _get(meta, "prompt_tokens", list, "metadata")
    if len(tokens) > MAX_NODES or not all(isinstance(t, str) for t in tokens):
        raise _Bad("metadata.prompt_tokens: expected a list of strings")
    tokens = [_text(t, 200) for t in tokens]
    nodes_in = _get(doc, "nodes", list, "graph")
    links_in = _get(doc, "links", list, "graph")
    if len(nodes_in) > MAX_NODES:
        raise _Bad(f"nodes: {len(nodes_in):,} nodes, more than the viewer draws ({MAX_NODES:,})")
    if len(links_in) > MAX_LINKS:
        raise _Bad(f"links: {len(links_in):,} links, more than the viewer draws ({MAX_LINKS:,})")
    nodes, index = [], {}
    for i, n in enumerate(nodes_in):
        where = f"nodes[{i}]"
        if not isinstance(n, dict):
            raise _Bad(f"{where}: expected an object")
        nid = _text(_get(n, "node_id", str, where), 200)
        pos = _get(n, "ctx_idx", int, where)
        if not 0 <= pos < max(len(tokens), 1) + 1_000_000:
            raise _Bad(f"{where}.ctx_idx: {pos} is out of range")
        ftype = _get(n, "feature_type", str, where)
        kind = KINDS.get(ftype, "other")
        layer = n.get("layer")
        if not isinstance(layer, str | int) or isinstance(layer, bool):
            raise _Bad(f"{where}.layer: expected a string or an integer")
        row = _row(layer, where)
        feature = _get(n, "feature", int, where, optional=True)
        clerp = _text(_get(n, "clerp", str, where, optional=True) or "", 500)
        act = _get(n, "activation", int | float, where, optional=True)
        infl = _get(n, "influence", int | float, where, optional=True)
        prob = _get(n, "token_prob", int | float, where, optional=True)
        node = {"id": nid, "kind": kind, "type": _text(ftype, 80), "row": row, "layer": str(layer)[:20], "pos": pos,
                "feature": feature, "label": _label(kind, nid, layer, pos, feature, tokens, clerp), "clerp": clerp,
                "activation": act, "influence": infl, "prob": prob,
                "target": n.get("is_target_logit") is True}
        if kind == "feature":  # the key of hexray graph's per-feature extras: "{layer}_{index}"
            node["fkey"] = f"{layer}_{node['label'][len(f'L{layer}F'):].split('@')[0]}"
        if n.get("qk_tracing_results") is not None:
            node["qk"] = _qk(n["qk_tracing_results"], f"{where}.qk_tracing_results")
        index.setdefault(nid, i)  # circuit-tracer's ids can repeat (an error and a layer-0 feature): the first
        nodes.append(node)
    src, tgt, w = [], [], []
    for j, e in enumerate(links_in):
        where = f"links[{j}]"
        if not isinstance(e, dict):
            raise _Bad(f"{where}: expected an object")
        s, t = _get(e, "source", str, where), _get(e, "target", str, where)
        weight = _get(e, "weight", int | float, where)
        if s not in index or t not in index:
            raise _Bad(f"{where}: {'source' if s not in index else 'target'} "
                       f"{one_line((s if s not in index else t)[:80])!r} is not a node of the graph")
        src.append(index[s])
        tgt.append(index[t])
        w.append(float(f"{weight:.7g}"))
    features = {}
    extra = doc.get("hexray_features")
    if extra is not None:
        if not isinstance(extra, dict) or len(extra) > MAX_NODES:
            raise _Bad("hexray_features: expected an object")
        features = {_text(str(k), 40): _feature_extra(v, f"hexray_features[{str(k)[:40]!r}]") for k, v in extra.items()}
    qk = []
    traced = doc.get("hexray_qk_tracing")
    if traced is not None:
        if not isinstance(traced, list) or len(traced) > 1000:
            raise _Bad("hexray_qk_tracing: expected a list")
        for j, r in enumerate(traced):
            where = f"hexray_qk_tracing[{j}]"
            if not isinstance(r, dict):
                raise _Bad(f"{where}: expected an object")
            item = {k: _get(r, k, int, where) for k in ("layer", "head", "query", "key")}
            for k in ("score", "recorded_score", "bias", "pair_sum", "direct_effect_on_logit"):
                item[k] = _get(r, k, int | float, where, optional=True)
            item["results"] = _qk(r.get("results"), f"{where}.results")
            qk.append(item)
    extra_nodes = doc.get("qk_only_nodes")
    qk_names = {}
    if isinstance(extra_nodes, dict):  # sources a QK split names that the pruned graph dropped
        for k, d in list(extra_nodes.items())[:MAX_NODES]:
            if isinstance(d, dict) and isinstance(d.get("ctx_idx"), int) and isinstance(d.get("feature_type"), str):
                kind = KINDS.get(d["feature_type"], "other")
                try:
                    qk_names[_text(str(k), 200)] = _label(kind, str(k), d.get("layer"), d["ctx_idx"], d.get("feature"),
                                                          tokens, "")
                except _Bad:
                    pass
    info = meta.get("info") if isinstance(meta.get("info"), dict) else {}
    return {"name": name, "slug": _text(str(meta.get("slug", "")), 200), "scan": _text(str(meta.get("scan", "")), 200),
            "prompt": _text(str(meta.get("prompt", "")), 100_000), "tokens": tokens,
            "description": _text(str(info.get("description", "")), 1000),
            "nodes": nodes, "src": src, "tgt": tgt, "w": w, "features": features, "qk": qk, "qk_names": qk_names}


def load(path: str) -> dict:
    """A graph JSON file for the viewer; one ``HexRayError`` line for anything wrong with it."""
    doc = read(path)
    try:
        return convert(doc, os.path.basename(path))
    except _Bad as e:
        raise HexRayError(f"{one_line(path)}: not a graph the viewer can show: {one_line(str(e))}") from None
