"""The built front end shipped in hexray_view/static/ is what viewer/src builds to, and is safe to inline."""

from __future__ import annotations

import os
import shutil
import subprocess

from prereq import missing

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VIEWER = os.path.join(REPO, "viewer")
STATIC = os.path.join(REPO, "hexray_view", "static")


def test_assets_are_shipped_and_inline_safe():
    from hexray_view import page

    js, css = page.asset("viewer.js"), page.asset("viewer.css")
    assert len(js) > 10_000 and len(css) > 1_000
    assert "</script" not in js.lower() and "</style" not in css.lower()
    # no URL the page could fetch: the report must work offline
    for text in (js, css):
        assert "http://" not in text and "https://" not in text and "@import" not in text


def test_committed_build_matches_the_sources(tmp_path):
    npm = shutil.which("npm")
    if npm is None:
        missing("npm is not installed (apt-get install nodejs npm)")
    if not os.path.isdir(os.path.join(VIEWER, "node_modules")):
        subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=VIEWER, check=True, capture_output=True, timeout=600)
    esbuild = os.path.join(VIEWER, "node_modules", ".bin", "esbuild")
    subprocess.run([os.path.join(VIEWER, "node_modules", ".bin", "tsc"), "--noEmit", "-p", "."], cwd=VIEWER, check=True,
                   capture_output=True, timeout=300)
    subprocess.run([esbuild, "src/main.ts", "--bundle", "--minify", "--format=iife", "--target=es2020",
                    f"--outfile={tmp_path / 'viewer.js'}"], cwd=VIEWER, check=True, capture_output=True, timeout=300)
    subprocess.run([esbuild, "src/viewer.css", "--minify", f"--outfile={tmp_path / 'viewer.css'}"], cwd=VIEWER,
                   check=True, capture_output=True, timeout=300)
    for name in ("viewer.js", "viewer.css"):
        built = (tmp_path / name).read_text(encoding="utf-8")
        shipped = open(os.path.join(STATIC, name), encoding="utf-8").read()
        assert built == shipped, f"hexray_view/static/{name} is stale: run `cd viewer && npm ci && npm run build`"
