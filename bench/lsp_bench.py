"""Latency of `hexray lsp`, measured from a client over stdio (the way an editor sees it).

    python bench/lsp_bench.py                 # everything; ~2-3 minutes on 2 busy cores
    python bench/lsp_bench.py --quick         # fewer samples
    python bench/lsp_bench.py --json out.json

What it measures (p50/p90/p99/max over N requests, milliseconds):

1. spawn -> ``initialize`` answered, and spawn -> first hover answered (after ``initialized``).
2. For prompts of 1,000 and 6,000 tokens (recorded by the server's own worker with a tiny random
   GPT-2 of n_ctx 8192, ``tests.lsp_support:tiny_gpt2_big_context_factory``):
   hover at random tokens (and, idle, the same without source attribution as the baseline; hover then
   ``documentHighlight`` at the same random token, as an editor does when the cursor rests there, and a
   highlight on its own); inlay hints for a visible range (50 lines) and for the whole document
   (what Neovim asks for), first request (builds the hint cache) and then warm; all of it idle
   and again while the worker records another 6,000-token prompt in a loop.
3. Save -> refreshed: with ``recordOnSave`` on and the worker warm, the time from ``didSave`` of a
   changed 200-token prompt to the first hover that shows the new trace, with the embedded demo
   model ``hexray-demo`` on CPU when it is installed (else the tiny model, and the output says so).

Targets (issue "hexray lsp: per-token attribution in the editor"): hover p99 < 20 ms; inlay hints
for 1,000 tokens < 50 ms; spawn to initialized < 1.5 s; save to refreshed < 1 s.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

WORDS = ["the", "model", "attends", "to", "Paris", "🙂", "naïve", "token", ",", ".", "東京", "and", "cats", "step",
         "answer", "is", "5", "so", "we", "think"]
BIG_FACTORY = "tests.lsp_support:tiny_gpt2_big_context_factory"


def stats(xs: list[float]) -> dict:
    xs = sorted(xs)
    q = lambda p: xs[min(len(xs) - 1, int(p * len(xs)))]  # noqa: E731
    return {"n": len(xs), "p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "max": xs[-1]}


def fmt(s: dict) -> str:
    return f"n={s['n']:<4} p50={s['p50']:7.2f}  p90={s['p90']:7.2f}  p99={s['p99']:7.2f}  max={s['max']:7.2f} ms"


def make_text(n_tokens: int, rnd: random.Random, tokenizer) -> str:
    """Lines of 12 random words until the tiny tokenizer makes at least n_tokens tokens of it."""
    lines: list[str] = []
    while True:
        lines.append(" ".join(rnd.choice(WORDS) for _ in range(12)))
        text = "\n".join(lines) + "\n"
        if len(tokenizer(text)["input_ids"]) >= n_tokens:
            return text


class RawClient:
    """A minimal JSON-RPC client over the server's stdio: results are plain ``json.loads`` output, as
    an editor gets them (pygls' own client would add its cattrs structuring to every figure)."""

    def __init__(self, settings: dict):
        self.settings = settings
        self.proc = None
        self.next_id = 0
        self.pending: dict[int, asyncio.Future] = {}
        self.diagnostics: dict[str, list] = {}
        self.progress_ends: list[tuple[float, str]] = []

    async def start(self, env: dict, command: tuple[str, ...] = ("-m", "hexray_lsp")) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, *command, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL, env=env)
        self.reader = asyncio.ensure_future(self._read())

    def _send(self, obj: dict) -> None:
        body = json.dumps(obj).encode()
        self.proc.stdin.write(b"Content-Length: %d\r\n\r\n" % len(body) + body)

    async def _read(self) -> None:
        out = self.proc.stdout
        while True:
            length = None
            while True:
                line = await out.readline()
                if not line:
                    return
                line = line.strip()
                if not line:
                    break
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            msg = json.loads(await out.readexactly(length))
            if "method" in msg and "id" in msg:  # a request from the server
                answer = self._answer(msg["method"], msg.get("params"))
                self._send({"jsonrpc": "2.0", "id": msg["id"], "result": answer})
            elif "method" in msg:
                if msg["method"] == "$/progress" and msg["params"]["value"].get("kind") == "end":
                    self.progress_ends.append((time.perf_counter(), msg["params"]["value"].get("message", "")))
                elif msg["method"] == "textDocument/publishDiagnostics":
                    self.diagnostics[msg["params"]["uri"]] = msg["params"]["diagnostics"]
                elif msg["method"] == "window/showMessage":
                    print("  server says:", msg["params"]["message"])
            else:
                fut = self.pending.pop(msg.get("id"), None)
                if fut is not None and not fut.done():
                    if "error" in msg:
                        fut.set_exception(RuntimeError(msg["error"].get("message")))
                    else:
                        fut.set_result(msg.get("result"))

    def _answer(self, method: str, params):
        if method == "workspace/configuration":
            return [self.settings for _ in params["items"]]
        return None

    async def request(self, method: str, params):
        self.next_id += 1
        fut = asyncio.get_running_loop().create_future()
        self.pending[self.next_id] = fut
        self._send({"jsonrpc": "2.0", "id": self.next_id, "method": method, "params": params})
        return await fut

    def notify(self, method: str, params) -> None:
        self._send({"jsonrpc": "2.0", "method": method, "params": params})

    async def stop(self) -> None:
        await self.request("shutdown", None)
        self.notify("exit", None)
        await asyncio.wait_for(self.proc.wait(), 10)
        self.reader.cancel()


class Bench:
    def __init__(self, root: Path, settings: dict, env: dict, command: tuple[str, ...] = ("-m", "hexray_lsp")):
        self.root, self.settings, self.env, self.command = root, settings, env, command
        self.client = RawClient(settings)

    async def start(self) -> tuple[float, float]:
        c = self.client
        t0 = time.perf_counter()
        await c.start(self.env, self.command)
        caps = {"window": {"workDoneProgress": True},
                "workspace": {"configuration": True, "inlayHint": {"refreshSupport": True}},
                "textDocument": {"hover": {"contentFormat": ["markdown"]}, "inlayHint": {}}}
        await c.request("initialize", {"processId": os.getpid(), "rootUri": self.root.as_uri(), "capabilities": caps,
                                       "initializationOptions": {"hexray": self.settings}})
        t_init = (time.perf_counter() - t0) * 1000
        c.notify("initialized", {})
        probe = self.root / "probe.prompt"
        probe.write_text("hello\n")
        uri = self.open(probe)
        await self.hover(uri, 0, 1)
        return t_init, (time.perf_counter() - t0) * 1000

    def open(self, path: Path, text: str | None = None) -> str:
        text = path.read_text(encoding="utf-8") if text is None else text
        uri = path.as_uri()
        self.client.notify("textDocument/didOpen", {"textDocument": {"uri": uri, "languageId": "hexray-prompt",
                                                                     "version": 1, "text": text}})
        return uri

    def change(self, uri: str, text: str, version: int) -> None:
        self.client.notify("textDocument/didChange", {"textDocument": {"uri": uri, "version": version},
                                                      "contentChanges": [{"text": text}]})

    def save(self, uri: str) -> None:
        self.client.notify("textDocument/didSave", {"textDocument": {"uri": uri}})

    async def hover(self, uri: str, line: int, col: int):
        return await self.client.request("textDocument/hover", {"textDocument": {"uri": uri},
                                                                "position": {"line": line, "character": col}})

    async def highlight(self, uri: str, line: int, col: int):
        return await self.client.request("textDocument/documentHighlight", {
            "textDocument": {"uri": uri}, "position": {"line": line, "character": col}})

    def configure(self, settings: dict) -> None:
        self.client.notify("workspace/didChangeConfiguration", {"settings": {"hexray": settings}})

    async def hints(self, uri: str, l0: int, l1: int):
        return await self.client.request("textDocument/inlayHint", {
            "textDocument": {"uri": uri}, "range": {"start": {"line": l0, "character": 0},
                                                    "end": {"line": l1, "character": 0}}})

    async def record(self, uri: str) -> dict:
        return await self.client.request("workspace/executeCommand",
                                         {"command": "hexray.recordTrace", "arguments": [uri]})

    async def stop(self) -> None:
        await self.client.stop()


async def timed(coro) -> tuple[object, float]:
    t0 = time.perf_counter()
    r = await coro
    return r, (time.perf_counter() - t0) * 1000


async def measure_doc(b: Bench, uri: str, text: str, rnd: random.Random, n_hover: int, n_inlay: int,
                      busy_uri: str | None) -> dict:
    lines = text.split("\n")
    n_lines = len(lines)
    out = {}

    def rand_pos():
        ln = rnd.randrange(max(1, n_lines - 1))
        # characters: UTF-16 columns are what this client (no positionEncodings) uses
        col = rnd.randrange(max(1, len(lines[ln].encode("utf-16-le")) // 2))
        return ln, col

    async def hovers(n):
        lat = []
        for _ in range(n):
            ln, col = rand_pos()
            lat.append((await timed(b.hover(uri, ln, col)))[1])
        return lat

    async def with_highlights(n):
        """What an editor does when the cursor rests on a token: hover, then documentHighlight there.
        Random positions, so nearly every hover computes its token's sources (the highlight reuses them)."""
        hov, hl, pair, found = [], [], [], 0
        for _ in range(n):
            ln, col = rand_pos()
            _, a = await timed(b.hover(uri, ln, col))
            r, c = await timed(b.highlight(uri, ln, col))
            hov.append(a)
            hl.append(c)
            pair.append(a + c)
            found += bool(r)
        lone = []
        for _ in range(max(1, n // 2)):  # a highlight on its own (a client that highlights without hovering)
            ln, col = rand_pos()
            lone.append((await timed(b.highlight(uri, ln, col)))[1])
        return {"hover_with_sources": stats(hov), "highlight_after_hover": stats(hl),
                "hover_plus_highlight": stats(pair), "highlight_alone": stats(lone), "with_highlights": found}

    if busy_uri is None:
        first, out["inlay_whole_first_ms"] = await timed(b.hints(uri, 0, n_lines + 1))
        out["hints"] = len(first)
        # baseline: the hover without source attribution (hover.sources 0, highlights off), same run
        b.configure({**b.settings, "hover": {"sources": 0}, "highlights": {"max": 0}})
        await asyncio.sleep(0.2)
        out["hover_no_sources"] = stats(await hovers(n_hover))
        b.configure(b.settings)
        await asyncio.sleep(0.2)
        out.update(await with_highlights(n_hover))
        out["hover"] = stats(await hovers(n_hover))
        lat, n = [], 0
        for _ in range(n_inlay):
            l0 = rnd.randrange(max(1, n_lines - 50))
            h, ms = await timed(b.hints(uri, l0, l0 + 50))
            lat.append(ms)
            n = max(n, len(h))
        out["inlay_visible"] = stats(lat)
        out["visible_hints"] = n
        out["inlay_whole"] = stats([(await timed(b.hints(uri, 0, n_lines + 1)))[1] for _ in range(n_inlay)])
        return out

    # while the worker records another big prompt, again and again
    stop = asyncio.Event()
    recordings = []

    async def recorder_loop():
        while not stop.is_set():
            r, ms = await timed(b.record(busy_uri))
            recordings.append(ms)

    task = asyncio.ensure_future(recorder_loop())
    await asyncio.sleep(0.3)
    out["hover"] = stats(await hovers(n_hover))
    lat, n = [], 0
    for _ in range(n_inlay):
        l0 = rnd.randrange(max(1, n_lines - 50))
        h, ms = await timed(b.hints(uri, l0, l0 + 50))
        lat.append(ms)
        n = max(n, len(h))
    out["inlay_visible"] = stats(lat)
    out["visible_hints"] = n
    out["inlay_whole"] = stats([(await timed(b.hints(uri, 0, n_lines + 1)))[1] for _ in range(max(5, n_inlay // 2))])
    stop.set()
    await task
    out["recordings_during"] = len(recordings)
    return out


async def save_to_refreshed(root: Path, env: dict, settings: dict, rnd: random.Random, tokenizer, n: int) -> dict:
    b = Bench(root, {**settings, "recordOnSave": True}, env)
    await b.start()
    path = root / "save.prompt"
    text = make_text(200, rnd, tokenizer)
    path.write_text(text, encoding="utf-8")
    uri = b.open(path, text)
    res, cold = await timed(b.record(uri))
    assert res["status"] == "recorded", res
    lat, worker = [], []
    for i in range(n):
        text = text.rstrip("\n") + f" {rnd.choice(WORDS)}\n"
        b.change(uri, text, 10 + i)
        h = await b.hover(uri, 0, 1)
        assert h is not None and "stale" in h["contents"]["value"], h
        t0 = time.perf_counter()
        b.save(uri)
        while True:
            h = await b.hover(uri, 0, 1)
            if h is not None and "stale" not in h["contents"]["value"]:
                break
            failed = [d["message"] for d in b.client.diagnostics.get(uri, []) if d.get("code") == "recording-failed"]
            if failed or time.perf_counter() - t0 > 60:
                raise RuntimeError(f"the saved prompt was not recorded: {failed}")
            await asyncio.sleep(0.005)
        lat.append((time.perf_counter() - t0) * 1000)
        ends = [m for ts, m in b.client.progress_ends if ts >= t0]
        if ends:  # "N tokens in X s": the worker's own time for this recording
            worker.append(float(ends[-1].split(" in ")[1].rstrip(" s")) * 1000)
    await b.stop()
    return {"first_record_ms": cold, "tokens": res["tokens"], "save_to_refreshed": stats(lat),
            "worker_record": stats(worker) if worker else None,
            "debounce_ms": settings.get("recordOnSaveDelayMs", 200)}


async def main(args) -> dict:
    import torch  # noqa: F401  (the tokenizer below imports it anyway; keep it out of the timings)

    sys.path.insert(0, str(REPO / "tests"))
    import tiny_models

    tokenizer = tiny_models.build_tokenizer()
    # This client imported torch and transformers (for the tokenizer): hundreds of thousands of
    # objects whose cyclic-GC scans (~100-200 ms each on this machine) would otherwise land in the
    # middle of timed requests and be counted as the server's latency.
    gc.collect()
    gc.freeze()
    rnd = random.Random(0)
    root = Path(tempfile.mkdtemp(prefix="lsp-bench-"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "HEXRAY_CACHE": str(root / "cache")}
    settings = {"modelFactory": BIG_FACTORY, "extraPaths": [str(REPO)], "inlayHints": "probability"}
    results: dict = {"machine": machine()}

    # 1. start-up
    if "start" in args.parts:
        for label, command in (("python -m hexray_lsp", ("-m", "hexray_lsp")),
                               ("hexray lsp", ("-m", "hexray_core", "lsp"))):
            spawn = []
            for _ in range(args.starts):
                b = Bench(root, settings, env, command)
                spawn.append(await b.start())
                await b.stop()
            key = label.replace(" ", "_")
            results[f"spawn_to_initialize_ms[{key}]"] = init = stats([s[0] for s in spawn])
            results[f"spawn_to_first_hover_ms[{key}]"] = first = stats([s[1] for s in spawn])
            print(f"{label}: spawn -> initialize answered:  ", fmt(init))
            print(f"{label}: spawn -> first hover answered: ", fmt(first))
    if "latency" in args.parts:
        await latency(args, results, root, env, settings, rnd, tokenizer)
    if "save" in args.parts:
        await save(args, results, root, env, rnd, tokenizer)
    return results


async def latency(args, results, root, env, settings, rnd, tokenizer) -> None:

    # 2. hover and inlay hints on 1,000 and 6,000 tokens, idle and while recording
    b = Bench(root, settings, env)
    await b.start()
    docs = {}
    for n in (1000, 6000):
        text = make_text(n, rnd, tokenizer)
        path = root / f"doc{n}.prompt"
        path.write_text(text, encoding="utf-8")
        uri = b.open(path, text)
        res, ms = await timed(b.record(uri))
        assert res["status"] == "recorded", res
        docs[n] = (uri, text)
        print(f"recorded {res['tokens']} tokens in {ms:.0f} ms (worker forward+write {res['seconds'] * 1000:.0f} ms)"
              f"{' (includes starting the worker)' if n == 1000 else ''}")
        results[f"record_{n}_ms"] = ms
        results[f"tokens_{n}"] = res["tokens"]
    busy = root / "busy.prompt"
    busy_text = make_text(6000, rnd, tokenizer)
    busy.write_text(busy_text, encoding="utf-8")
    busy_uri = b.open(busy, busy_text)
    for n, (uri, text) in docs.items():
        for label, busy_arg in (("idle", None), ("recording", busy_uri)):
            r = await measure_doc(b, uri, text, rnd, args.hovers, args.inlays, busy_arg)
            results[f"{n}_{label}"] = r
            print(f"\n{results[f'tokens_{n}']} tokens, {label}"
                  + (f" ({r['recordings_during']} recordings of 6,000 tokens ran meanwhile)" if busy_arg else ""))
            print("  hover:                   ", fmt(r["hover"]))
            if "hover_no_sources" in r:
                print("  hover, sources off:      ", fmt(r["hover_no_sources"]))
                print("  hover (then highlight):  ", fmt(r["hover_with_sources"]))
                print("  highlight after hover:   ", fmt(r["highlight_after_hover"]))
                print("  hover + highlight:       ", fmt(r["hover_plus_highlight"]))
                print(f"  highlight alone:          {fmt(r['highlight_alone'])} ({r['with_highlights']} of "
                      f"{r['hover_plus_highlight']['n']} positions had highlights)")
            if "inlay_whole_first_ms" in r:
                print(f"  inlay whole doc, first:   {r['inlay_whole_first_ms']:.2f} ms ({r['hints']} hints)")
            print(f"  inlay 50 lines (~{r.get('visible_hints', '?')}):", fmt(r["inlay_visible"]))
            print("  inlay whole doc:         ", fmt(r["inlay_whole"]))
    await b.stop()


async def save(args, results, root, env, rnd, tokenizer) -> None:
    demo = REPO / "hexray_core" / "models" / "hexray-demo"
    save_tokenizer = tokenizer
    if (demo / "config.json").exists():
        from transformers import AutoTokenizer

        save_settings = {"model": "hexray-demo", "device": "cpu"}
        which = "hexray-demo (CPU)"
        save_tokenizer = AutoTokenizer.from_pretrained(str(demo))
    else:
        save_settings = {"modelFactory": BIG_FACTORY, "extraPaths": [str(REPO)]}
        which = "tiny GPT-2, n_ctx 8192 (hexray-demo is not installed yet)"
    r = await save_to_refreshed(root, env, save_settings, rnd, save_tokenizer, args.saves)
    results["save"] = {**r, "model": which}
    print(f"\nsave -> refreshed hover, {r['tokens']}-token prompt, {which}, debounce {r['debounce_ms']} ms:")
    print("   didSave -> new hover:       ", fmt(r["save_to_refreshed"]))
    if r["worker_record"]:
        print("   of which the worker recorded:", fmt(r["worker_record"]))


def machine() -> dict:
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {"python": platform.python_version(), "cpus": os.cpu_count(), "cpu": cpu, "loadavg": load,
            "platform": platform.platform()}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer samples")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--parts", default="start,latency,save", help="comma-separated: start, latency, save")
    args = ap.parse_args()
    args.parts = set(args.parts.split(","))
    args.starts, args.hovers, args.inlays, args.saves = (3, 200, 20, 5) if args.quick else (5, 500, 50, 10)
    try:
        out = asyncio.run(main(args))
    finally:
        for leftover in Path(tempfile.gettempdir()).glob("lsp-bench-*"):
            shutil.rmtree(leftover, ignore_errors=True)
    print("\nmachine:", json.dumps(out["machine"]))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2, default=float))
