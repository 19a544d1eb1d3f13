"""Shared by the viewer tests: a real demo-model trace on disk, the `hexray` CLI, a served viewer, Chromium
driven by Playwright (conftest's ``browser`` fixture) and pages that record their errors and requests."""

from __future__ import annotations

import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import time

from prereq import missing, require_module

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
# (the benchmarks) JS: a promise resolved once the next frame is painted; the ms from navigation start to it
FRAME = "new Promise(r => requestAnimationFrame(() => setTimeout(r, 0)))"
PAINTED = f"(async () => {{ await {FRAME}; return performance.now(); }})()"
PROMPTS = [
    "Step 1: The capital of France is Paris.\nStep 2: The capital of Germany is Berlin.\nSo the answer is",
    "The cat sat on the mat. The dog sat on the",
]


def env() -> dict:
    return {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}


def hexray(*args, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "hexray", *map(str, args)], capture_output=True, text=True,
                         cwd=REPO, env=env(), timeout=timeout)
    if check and out.returncode != 0:
        raise AssertionError(f"hexray {args} failed ({out.returncode}): {out.stderr[-2000:]}")
    return out


def record_demo(folder) -> str:
    """Two runs of the embedded demo model (a multi-step text, a short one), the kit bundled."""
    prompts = os.path.join(folder, "prompts.jsonl")
    with open(prompts, "w", encoding="utf-8") as f:
        for p in PROMPTS:
            f.write(json.dumps({"prompt": p}) + "\n")
    path = os.path.join(folder, "demo.hxr")
    hexray("record", "--model", "hexray-demo", "--device", "cpu", "--prompts-file", prompts, "-o", path, "-q")
    return path


def replay_json(*args) -> dict:
    return json.loads(hexray(*args, "--json").stdout)


class Served:
    """`hexray view --no-browser` in a subprocess; `url` is the first line it printed."""

    def __init__(self, *traces, extra=()):
        self.proc = subprocess.Popen([sys.executable, "-m", "hexray", "view", *map(str, traces), "--no-browser",
                                      *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                                     env=env())
        line = self.proc.stdout.readline().strip()
        if not line:
            raise AssertionError(f"hexray view printed no URL: {self.proc.stderr.read()[-2000:]}")
        self.url = line
        m = re.fullmatch(r"http://(127\.0\.0\.1|\[::1\]|[\d.]+):(\d+)/([A-Za-z0-9_-]{20,})/", line)
        assert m, f"unexpected URL line {line!r}"
        self.host, self.port, self.token = m.group(1), int(m.group(2)), m.group(3)

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def wait_for(predicate, timeout: float = 10.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("timed out")


def require_browser(*, module_level: bool = False):
    """``playwright.sync_api``, once Chromium is there too (without either: skipped, failed under CI)."""
    if not os.path.exists(CHROMIUM):
        missing(f"{CHROMIUM} is not installed (apt-get install chromium)", module_level=module_level)
    return require_module("playwright.sync_api", "the [dev] extra: pip install playwright", module_level=module_level)


@contextlib.contextmanager
def chromium():
    """Debian's Chromium, launched by Playwright for the block."""
    with require_browser().sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


def new_page(browser, url: str | None = None, *, width: int = 1300):
    """(page, errors, requests): a page whose console errors and warnings, page errors and requests fill the two
    lists as it runs; with ``url``, opened there and waited on until the viewer shows a selection."""
    page = browser.new_page(viewport={"width": width, "height": 1000})
    errors: list[str] = []
    requests: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type in ("error", "warning") else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("request", lambda r: requests.append(r.url))
    if url is not None:
        page.goto(url)
        page.wait_for_selector("body[data-pos], body[data-patch]", timeout=30_000)  # tokens, or a sweep's heatmap
    return page, errors, requests


def median_p90(name: str, times) -> dict:
    """``{name}_median_ms`` and ``{name}_p90_ms`` of a benchmark's timings."""
    xs = sorted(times)
    return {f"{name}_median_ms": statistics.median(xs), f"{name}_p90_ms": xs[int(0.9 * (len(xs) - 1))]}
