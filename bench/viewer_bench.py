"""Viewer benchmark: first paint of `hexray view` for 64 (baseline), 1k and 16k-token traces, token click →
panels updated, and the size of `hexray report` at 1k tokens.

    python bench/viewer_bench.py [--clicks 20] [--json out.json]

Traces: a random tiny GPT-2 (2 layers, d_model 64, 1 head, n_ctx 16,448; tests/tiny_models.py) recorded
with `--hooks default` (attention stored as q/k) on random words, in one run each. Browser: Debian's
Chromium through Playwright, a fresh page per trace. Timings are wall clock in the page
(`performance.now()` from navigation start):

    first paint   the token strip is in the DOM and painted (body[data-ready], then a frame)
    panels        the selected (last) token's panels are filled (body[data-pos], then a frame)
    click         a click on a token in view (a random position never asked for before, so the server computes
                  it; scrolled into view first, untimed, as a user sees what they click) until its panels are
                  filled and painted; median and 90th percentile
    jump          the same for a token out of view (the strip scrolls to it: new blocks are laid out and painted)
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

WORDS = ["the", "model", "attends", "to", "Paris", "token", ",", ".", "and", "cats", "step", "answer", "is", "5",
         "so", "we", "think", "\n"]
SIZES = (64, 1000, 16000)

CLICK = """async ([i, scroll]) => {
  const tok = document.querySelector(`#strip .tok[data-i='${i}']`);
  if (scroll) {  // as a user would: the token is scrolled into view (and painted) before it is clicked
    const s = document.getElementById("strip");
    s.scrollTop += tok.getBoundingClientRect().top - s.getBoundingClientRect().top - s.clientHeight / 2;
    await FRAME; await FRAME;
  }
  const t0 = performance.now();
  const done = new Promise(r => { const o = new MutationObserver(() => {
    if (document.body.dataset.pos === String(i)) { o.disconnect(); r(); } });
    o.observe(document.body, { attributes: true }); });
  delete document.body.dataset.pos;
  tok.click();
  await done; await FRAME;
  return performance.now() - t0;
}""".replace("FRAME", FRAME)


def record(work: str) -> dict[int, str]:
    import torch

    torch.set_num_threads(1)
    import tiny_models

    from hexray_core.record import Recorder

    tok = tiny_models.build_tokenizer()
    # One head: TransformerLens materialises [heads, n, n] scores and patterns per layer while recording (4 heads at
    # 16k tokens took > 19 GB); the viewer's cost does not depend on the head count.
    rec = Recorder(tiny_models.build_tiny_gpt2(tok, n_head=1, n_ctx=max(SIZES) + 448), tokenizer=tok, device="cpu")
    rnd = random.Random(0)
    paths = {}
    for n in SIZES:
        words: list[str] = []
        while len(tok(" ".join(words))["input_ids"]) < n:
            words.extend(rnd.choice(WORDS) for _ in range(64))
        ids = tok(" ".join(words))["input_ids"][:n - 1]
        text = tok.decode(ids)
        path = os.path.join(work, f"t{n}.hxr")
        t0 = time.perf_counter()
        rec.record([text], path, hooks="default")
        print(f"  recorded {n} tokens in {time.perf_counter() - t0:.1f} s: {os.path.getsize(path) / 1e6:.1f} MB",
              flush=True)
        paths[n] = path
    return paths


def measure_view(browser, path: str, clicks: int) -> dict:
    s = Served(path)
    try:
        page = browser.new_page(viewport={"width": 1300, "height": 1000})
        page.goto(s.url, wait_until="commit")
        page.wait_for_selector("body[data-ready]", timeout=60_000)
        paint = page.evaluate(PAINTED)
        page.wait_for_selector("body[data-pos]", timeout=60_000)
        panels = page.evaluate(PAINTED)
        n = page.eval_on_selector_all("#strip .tok", "els => els.length")
        rnd = random.Random(1)
        times = [page.evaluate(CLICK, [rnd.randrange(n), True]) for _ in range(clicks)]
        jumps = [page.evaluate(CLICK, [rnd.randrange(n), False]) for _ in range(clicks)]
        page.close()
        return {"tokens": n, "first_paint_ms": paint, "panels_ms": panels, **median_p90("click", times),
                "clicks": len(times), **median_p90("jump", jumps)}
    finally:
        s.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clicks", type=int, default=20)
    ap.add_argument("--json")
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="hexray-viewer-bench-")
    os.environ.setdefault("HEXRAY_CACHE", os.path.join(work, "cache"))
    os.environ["HF_HUB_OFFLINE"] = "1"
    paths = record(work)

    results: dict = {"view": {}, "machine": os.uname().machine, "cpus": os.cpu_count()}
    with chromium() as browser:
        for n, path in paths.items():
            r = measure_view(browser, path, args.clicks)
            results["view"][n] = r
            print(f"  view {r['tokens']:>6} tokens: first paint {r['first_paint_ms']:.0f} ms, panels "
                  f"{r['panels_ms']:.0f} ms, click → panels median {r['click_median_ms']:.0f} ms "
                  f"(p90 {r['click_p90_ms']:.0f} ms); selecting a token out of view (the strip scrolls to it) "
                  f"median {r['jump_median_ms']:.0f} ms (p90 {r['jump_p90_ms']:.0f} ms)", flush=True)
    out = os.path.join(work, "r1000.html")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "hexray_core", "report", paths[1000], "-o", out], check=True, cwd=REPO,
                   env={**os.environ, "PYTHONPATH": REPO}, capture_output=True)
    results["report_1000"] = {"bytes": os.path.getsize(out), "seconds": time.perf_counter() - t0}
    print(f"  report of 1000 tokens: {os.path.getsize(out) / 1e6:.2f} MB in {results['report_1000']['seconds']:.1f} s")
    base = results["view"][SIZES[0]]["first_paint_ms"]
    for n in SIZES[1:]:
        print(f"  first paint {n} / {SIZES[0]} tokens: {results['view'][n]['first_paint_ms'] / base:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
