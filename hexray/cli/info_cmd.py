"""`hexray info`: what a trace holds (runs, tokens, tensors, sizes, provenance), from its index alone.

Reads the trailer and index only (no tensor data), so it is instant on any size of file. Works on
any valid `.hxr` file, whatever metadata the writer put in it: every key is optional.
"""

from __future__ import annotations

import json
import os

from trace_format import WEIGHTS_RUN, TensorInfo, TraceReader

PREVIEW_CHARS = 60
MAX_TABLE_ROWS = 200  # the terminal tables stop here (a file may hold 100,000 runs); --json has them all
JSON_SCHEMA_VERSION = 1  # bump when a key of the --json output changes meaning or disappears


def add_parser(sub) -> None:
    p = sub.add_parser("info", help="summarise a trace: runs, tokens, tensors, sizes, provenance",
                       description="Summarise a .hxr trace from its index (no tensor data is read): file size, "
                                   "format version, times, model, runs with a prompt preview and token count, "
                                   "tensor count and raw vs stored bytes, and who wrote it.")
    p.add_argument("trace", help="a .hxr file")
    p.add_argument("--tensors", action="store_true", help="also list every tensor of each run (name, dtype, shape, "
                                                          "chunks, raw and stored bytes)")
    p.add_argument("--run", type=int, help="only this run (use -1 for the file's weights)")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON (stable keys) instead of tables")


def run(args) -> int:
    with TraceReader(args.trace) as r:
        summary = summarise(r, tensors=args.tensors, only_run=args.run)
    if args.json:
        print(json.dumps(summary, ensure_ascii=False, indent=2))
    else:
        render(summary)
    return 0


# -- the summary (a plain dict: the --json output) ------------------------------------------------

_BULKY = ("vocab",)  # metadata that can be megabytes (a bundled kit's token strings): counted, not printed


def _section(meta: dict, key: str) -> dict | None:
    """meta[key] if it is a map, without bulky entries (each replaced by ``n_<key>``, its length)."""
    d = meta.get(key)
    if not isinstance(d, dict):
        return None
    out = {}
    for k, v in d.items():
        if k in _BULKY:
            out[f"n_{k}"] = len(v) if isinstance(v, (list, bytes, str, dict)) else None
        else:
            out[k] = v
    return out


def _interventions(meta: dict) -> list[str] | None:
    """The specs of ``meta["interventions"]`` (``hexray record --intervene``), as recorded."""
    ivs = meta.get("interventions")
    if not isinstance(ivs, list):
        return None
    return [str(iv.get("spec")) if isinstance(iv, dict) else str(iv) for iv in ivs[:1000]]


def _intervention_dicts(meta: dict) -> dict | None:
    """spec -> the dictionary a feature intervention used ({name, fingerprint, path, kind}), when there are any."""
    ivs = meta.get("interventions")
    out = {}
    for iv in ivs[:1000] if isinstance(ivs, list) else []:
        d = iv.get("dict") if isinstance(iv, dict) else None
        if isinstance(d, dict):
            out[str(iv.get("spec"))] = {k: d.get(k) for k in ("name", "fingerprint", "path", "kind")}
    return out or None


def _get(d, *keys):
    """d[k1][k2]... or None when any level is missing or not a map (metadata keys are all optional)."""
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def _token_count(run: dict) -> int | None:
    tokens = run.get("tokens")
    if isinstance(tokens, list):
        return len(tokens)
    if isinstance(tokens, bytes):  # packed little-endian int32, as the format notes allow
        return len(tokens) // 4
    n = run.get("n_tokens")
    return n if isinstance(n, int) else None


def _sizes(infos: list[TensorInfo]) -> dict:
    raw = sum(t.nbytes for t in infos)
    stored = sum(t.stored_bytes for t in infos)
    return {"tensors": len(infos), "chunks": sum(len(t.chunks) for t in infos), "raw_bytes": raw,
            "stored_bytes": stored, "ratio": round(raw / stored, 3) if stored else None}


def _tensor_row(t: TensorInfo) -> dict:
    return {"name": t.name, "dtype": t.dtype, "shape": list(t.shape), "chunks": len(t.chunks),
            "raw_bytes": t.nbytes, "stored_bytes": t.stored_bytes}


def summarise(r: TraceReader, *, tensors: bool = False, only_run: int | None = None) -> dict:
    """Everything `hexray info` shows, as JSON-ready data. Keys are always present (values may be null)."""
    meta = r.meta
    by_run: dict[int, list[TensorInfo]] = {}
    for t in r.tensors():
        by_run.setdefault(t.run, []).append(t)
    runs = []
    for run in r.runs:
        rid = run["id"]
        if only_run is not None and rid != only_run:
            continue
        prompt = run.get("prompt") if isinstance(run.get("prompt"), str) else None
        n_tokens = _token_count(run)
        n_prompt = run.get("n_prompt_tokens") if isinstance(run.get("n_prompt_tokens"), int) else None
        entry = {
            "id": rid,
            "status": run.get("status"),
            "prompt": prompt,
            "prompt_chars": len(prompt) if prompt is not None else None,
            "n_tokens": n_tokens,
            "n_prompt_tokens": n_prompt,
            "n_generated": n_tokens - n_prompt if n_tokens is not None and n_prompt is not None else None,
            **_sizes(by_run.get(rid, [])),
        }
        if tensors:
            entry["tensor_list"] = [_tensor_row(t) for t in by_run.get(rid, [])]
        runs.append(entry)
    weights = None
    if only_run is None or only_run == WEIGHTS_RUN:
        weights = _sizes(by_run.get(WEIGHTS_RUN, []))
        if tensors:
            weights["tensor_list"] = [_tensor_row(t) for t in by_run.get(WEIGHTS_RUN, [])]
    all_infos = r.tensors()
    return {
        "schema": JSON_SCHEMA_VERSION,
        "path": os.path.abspath(r.path),
        "file_size": r.size,
        "format": {"version": f"{r.version[0]}.{r.version[1]}", "major": r.version[0], "minor": r.version[1],
                   "features": list(r.features), "uuid": r.file_uuid.hex(), "appends": r.appends},
        "created": meta.get("created") if isinstance(meta.get("created"), str) else None,
        "closed": meta.get("closed") if isinstance(meta.get("closed"), str) else None,
        "kind": _get(meta, "hexray", "trace"),
        "model": _section(meta, "model"),
        "tokenizer": _section(meta, "tokenizer"),
        "kit": _section(meta, "kit"),
        "storage": _section(meta, "storage"),
        "hooks": _section(meta, "hooks"),
        "interventions": _interventions(meta),
        "intervention_dicts": _intervention_dicts(meta),
        "forward": _section(meta, "forward"),
        "writer": _section(meta, "writer"),
        "meta_keys": sorted(str(k) for k in meta),
        "runs": runs,
        "weights": weights,
        "totals": {"runs": len(r.runs), **_sizes(all_infos)},
    }


# -- rendering ------------------------------------------------------------------------------------

def human(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)  # pragma: no cover


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _preview(text: str | None) -> str:
    if text is None:
        return "-"
    s = json.dumps(text, ensure_ascii=False)[1:-1]  # newlines and tabs stay visible
    return s if len(s) <= PREVIEW_CHARS else s[:PREVIEW_CHARS - 1] + "…"


def _model_line(model: dict) -> str:
    name = model.get("name", "?")
    bits = [str(v) for v in (model.get("source"), model.get("class") or model.get("architecture"),
                             model.get("dtype")) if v]
    rev = model.get("revision")
    if isinstance(rev, str) and rev:
        bits.append(f"rev {rev[:12]}")
    line = f"{name}" + (f" ({', '.join(bits)})" if bits else "")
    cfg = model.get("config")
    if isinstance(cfg, dict):
        dims = [f"{k} {cfg[k]}" for k in ("n_layers", "d_model", "n_heads", "d_head", "d_mlp", "d_vocab", "n_ctx")
                if k in cfg]
        extra = [str(cfg[k]) for k in ("normalization_type", "act_fn", "positional_embedding_type") if cfg.get(k)]
        if dims or extra:
            line += "\n        " + ", ".join(dims + extra)
    return line


def _kv_line(d: dict, skip=()) -> str:
    return ", ".join(f"{k} {v}" for k, v in d.items() if k not in skip and not isinstance(v, (dict, list)))


def _table(title: str, header: list[str], rows: list[list[str]], *, width: int, right=frozenset(),
           flexible: int = -1):
    """A compact table: every column as wide as its content, except ``flexible``, cut with "…" to fit ``width``."""
    from rich import box
    from rich.cells import cell_len
    from rich.table import Table
    from rich.text import Text

    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    flexible %= len(header)
    widths = [max([cell_len(col)] + [cell_len(r[i]) for r in rows]) for i, col in enumerate(header)]
    # padding (2 per column, none at the edges), a separator between columns and two edges: 3n - 1, plus slack
    budget = max(12, width - sum(w for i, w in enumerate(widths) if i != flexible) - 3 * len(header) - 1)
    for i, col in enumerate(header):
        table.add_column(col, justify="right" if i in right else "left", no_wrap=True,
                         width=min(widths[i], budget) if i == flexible else widths[i])
    for r in rows:
        cells = list(r)
        text = Text(cells[flexible])
        text.truncate(budget, overflow="ellipsis")
        cells[flexible] = text
        table.add_row(*cells)
    return table


def render(s: dict) -> None:
    from rich.console import Console
    from rich.text import Text

    from hexray.cli.render import print_unpadded

    # Metadata strings are the file's, not rich markup: a model name holding "[/" prints as it is.
    con = Console(highlight=False, markup=False, emoji=False)
    if not con.is_terminal:  # piped: whole lines, never wrapped at 80 columns (as the replay views)
        con = Console(highlight=False, markup=False, emoji=False, width=10_000)

    def say(line: str) -> None:  # one line: on a terminal, cut with an ellipsis rather than wrapped unindented
        con.print(line, no_wrap=True, overflow="ellipsis")  # (the console has markup off: the text is literal)

    def show(table) -> None:
        con.print(table) if con.is_terminal else print_unpadded(con, table)

    fmt = s["format"]
    con.print(Text(s["path"], style="bold"), no_wrap=True, overflow="ellipsis")
    appended = f", appended {fmt['appends']}x" if fmt["appends"] else ""
    features = f", features {', '.join(fmt['features'])}" if fmt["features"] else ""
    say(f"  file     {human(s['file_size'])} ({s['file_size']:,} bytes), .hxr v{fmt['version']}"
              f"{features}{appended}")
    say(f"  created  {s['created'] or '-'}   closed {s['closed'] or '-'}")
    if s["kind"]:
        say(f"  kind     {s['kind']}")
    if s["model"]:
        say(f"  model    {_model_line(s['model'])}")
        proc = s["model"].get("processing")
        if isinstance(proc, dict) and proc:
            on = [k for k, v in proc.items() if v is True]
            off = [k for k, v in proc.items() if v is False]
            say(f"  weights  {', '.join(on) or '-'}" + (f" (not: {', '.join(off)})" if off else ""))
    if s["tokenizer"]:
        tok = dict(s["tokenizer"])
        if isinstance(tok.get("sha256"), str):
            tok["sha256"] = tok["sha256"][:12]
        say(f"  tokenizer {_kv_line(tok)}")
    if s["kit"]:
        kit = s["kit"]
        sha = kit.get("sha256")
        say(f"  kit      {sha[:16] if isinstance(sha, str) else '-'}"
                  f"{' (bundled)' if kit.get('bundled') else ' (not bundled)'}"
                  + (f", {kit['n_vocab']} token strings" if isinstance(kit.get("n_vocab"), int) else ""))
    if s["storage"]:
        say(f"  storage  {_kv_line(s['storage'])}")
    if s["hooks"]:
        hooks = s["hooks"]
        req = hooks.get("requested")
        say(f"  hooks    {hooks.get('set', '-')}"
                  + (f" ({len(req)} requested)" if isinstance(req, list) else ""))
    dicts = s.get("intervention_dicts") or {}
    for i, spec in enumerate(s.get("interventions") or []):
        d = dicts.get(spec)
        using = f"  (dictionary {d.get('name')}, {d.get('kind')}, fingerprint {d.get('fingerprint')})" if d else ""
        say(f"  {'intervene' if i == 0 else '':9} {spec}{using}")
    fwd = s["forward"]
    if fwd:
        ran, asked, why = fwd.get("attention"), fwd.get("requested"), fwd.get("fallback")
        say(f"  attention {ran if isinstance(ran, str) else '-'}"
            + (f" (--attention {asked})" if isinstance(asked, str) else "")
            + (f"; eager because {why}" if isinstance(why, str) else ""))
    if s["writer"]:
        say(f"  writer   {_kv_line(s['writer'])}")

    rows = []
    for run in s["runs"]:
        tokens = "-" if run["n_tokens"] is None else str(run["n_tokens"])
        if run["n_generated"]:
            tokens += f" (+{run['n_generated']} gen)"
        rows.append([str(run["id"]), str(run["status"] or "-"), tokens, str(run["tensors"]), human(run["raw_bytes"]),
                     human(run["stored_bytes"]), _ratio(run["ratio"]), _preview(run["prompt"])])
    more_runs = len(rows) - MAX_TABLE_ROWS
    del rows[MAX_TABLE_ROWS:]
    w = s["weights"]
    if w and w["tensors"]:
        rows.append(["w", "weights", "-", str(w["tensors"]), human(w["raw_bytes"]), human(w["stored_bytes"]),
                     _ratio(w["ratio"]), "(file-level tensors)"])
    show(_table("runs", ["run", "status", "tokens", "tensors", "raw", "stored", "ratio", "prompt"], rows,
                     width=con.width, right={0, 2, 3, 4, 5, 6}))
    if more_runs > 0:
        say(f"  ... and {more_runs:,} more run{'' if more_runs == 1 else 's'} "
            "(hexray info --run ID, or --json, shows them)")
    t = s["totals"]
    say(f"  total    {t['runs']} run{'' if t['runs'] == 1 else 's'}, {t['tensors']} tensors in {t['chunks']} "
        f"chunks, {human(t['raw_bytes'])} raw -> {human(t['stored_bytes'])} stored ({_ratio(t['ratio'])})")

    for run in s["runs"] + ([dict(w, id="weights")] if w and "tensor_list" in w else []):
        if "tensor_list" not in run or not run["tensor_list"]:
            continue
        rows = []
        if len(run["tensor_list"]) > MAX_TABLE_ROWS:
            say(f"  (run {run['id']}: the first {MAX_TABLE_ROWS} of {len(run['tensor_list']):,} tensors; "
                      "--json has all)")
        for row in run["tensor_list"][:MAX_TABLE_ROWS]:
            ratio = row["raw_bytes"] / row["stored_bytes"] if row["stored_bytes"] else None
            rows.append([row["name"], row["dtype"], "[" + ", ".join(map(str, row["shape"])) + "]", str(row["chunks"]),
                         human(row["raw_bytes"]), human(row["stored_bytes"]), _ratio(ratio)])
        show(_table(f"tensors of run {run['id']}", ["name", "dtype", "shape", "chunks", "raw", "stored",
                                                           "ratio"], rows, width=con.width, right={3, 4, 5, 6},
                         flexible=0))
