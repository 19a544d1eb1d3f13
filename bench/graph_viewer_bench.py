"""Graph tab benchmark: first paint and click → panel for attribution graphs of 1k (baseline), 10k and 100k edges,
served by `hexray view graph.json` and opened from `hexray report`'s file.

    python bench/graph_viewer_bench.py [--clicks 20] [--json out.json]

Graphs: the real pipeline. The embedded demo model (4 layers, d_model 128) records one 63-token prompt; random
transcoders (d_sae 512, compat space) give it a few thousand active features; `hexray graph` builds the graph with
--node-threshold 1.0 --edge-threshold 1.0 (nothing pruned by influence) and --max-edges N keeps the N strongest
edges. Browser: Debian's Chromium through Playwright, a fresh page per graph. Timings are wall clock in the page
(`performance.now()` from navigation start):

    first paint   nodes and edges are drawn and painted (body[data-ready], then a frame)
    click         a click on a random node until its panel is filled and painted (body[data-node], then a
                  frame); median and 90th percentile
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "tests")]

from viewer_support import FRAME, PAINTED, Served, chromium, median_p90  # noqa: E402

EDGES = (1_000, 10_000, 100_000)
PROMPT = ("Step 1: The capital of France is Paris. Step 2: The capital of Germany is Berlin. Step 3: The capital "
          "of Italy is Rome. So the capital of Spain is")
CLICK = """async (i) => {
  const el = document.querySelector(`.gnode[data-i='${i}']`);
  el.scrollIntoView({ block: "center", inline: "center" });
  await FRAME;
  const id = el.dataset.id;
  const t0 = performance.now();
  const done = new Promise(r => { const o = new MutationObserver(() => {
    if (document.body.dataset.node === id) { o.disconnect(); r(); } });
    o.observe(document.body, { attributes: true }); });
  delete document.body.dataset.node;
  el.dispatchEvent(new MouseEvent("click", { bubbles: true }));
  await done; await FRAME;
  return performance.now() - t0;
}""".replace("FRAME", FRAME)


def hexray(*args) -> str:
    p = subprocess.run([sys.executable, "-m", "hexray", *map(str, args)], capture_output=True, text=True, cwd=REPO,
                       env={**os.environ, "PYTHONPATH": REPO})
    if p.returncode:
        raise SystemExit(f"hexray {args[0]} failed: {p.stderr}")
    return p.stdout


def build(work: str) -> dict[int, str]:
    from hexray_core.replay import open_trace
    from hexray_core.replay.graph import random_transcoders, save_circuit_tracer

    trace = os.path.join(work, "t.hxr")
    hexray("record", "--model", "hexray-demo", "--device", "cpu", "--prompt", PROMPT, "-o", trace, "-q")
    with open_trace(trace) as t:
        tc = os.path.join(work, "tc")
        save_circuit_tracer(random_transcoders(t.n_layers, int(t.config["d_model"]), 512, seed=1), tc)
    paths = {}
    for n in EDGES:
        out = os.path.join(work, f"g{n}.json")
        t0 = time.perf_counter()
        line = hexray("graph", trace, "--transcoders", tc, "--node-threshold", "1.0", "--edge-threshold", "1.0",
                      "--max-edges", n, "-o", out).splitlines()[0]
        print(f"  {line} ({time.perf_counter() - t0:.1f} s, {os.path.getsize(out) / 1e6:.1f} MB)", flush=True)
        paths[n] = out
    return paths


def measure(browser, url: str, clicks: int) -> dict:
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(url, wait_until="commit")
    page.wait_for_selector("body[data-ready]", timeout=120_000)
    paint = page.evaluate(PAINTED)
    nodes = page.eval_on_selector_all(".gnode", "els => els.length")
    edges = page.evaluate("document.getElementById('graph-summary').textContent")
    rnd = random.Random(1)
    times = [page.evaluate(CLICK, rnd.randrange(nodes)) for _ in range(clicks)]
    page.close()
    return {"nodes": nodes, "summary": edges, "first_paint_ms": paint, **median_p90("click", times),
            "clicks": len(times)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clicks", type=int, default=20)
    ap.add_argument("--json")
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="hexray-graph-viewer-bench-")
    os.environ.setdefault("HEXRAY_CACHE", os.path.join(work, "cache"))
    os.environ["HF_HUB_OFFLINE"] = "1"
    paths = build(work)

    results: dict = {"view": {}, "report": {}, "machine": os.uname().machine, "cpus": os.cpu_count()}
    with chromium() as browser:
        for n, path in paths.items():
            s = Served(path)
            try:
                r = results["view"][n] = measure(browser, s.url, args.clicks)
            finally:
                s.close()
            print(f"  view   {r['summary']}: first paint {r['first_paint_ms']:.0f} ms, click → panel median "
                  f"{r['click_median_ms']:.0f} ms (p90 {r['click_p90_ms']:.0f} ms)", flush=True)
            html = path[:-5] + ".html"
            hexray("report", path, "-o", html)
            r = results["report"][n] = {**measure(browser, "file://" + html, args.clicks),
                                        "bytes": os.path.getsize(html)}
            print(f"  report {os.path.getsize(html) / 1e6:.1f} MB: first paint {r['first_paint_ms']:.0f} ms, click → "
                  f"panel median {r['click_median_ms']:.0f} ms (p90 {r['click_p90_ms']:.0f} ms)", flush=True)
    base = results["view"][EDGES[0]]["first_paint_ms"]
    for n in EDGES[1:]:
        print(f"  first paint {n} / {EDGES[0]} edges: {results['view'][n]['first_paint_ms'] / base:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
