"""The README runs as written: every shell line that uses `hexray-demo`, every `$ hexray ...` example (its
output compared with the README's), and every python block, in the README's order, in a folder holding a copy
of examples/. `hexray` is the real CLI of this checkout (a shim on PATH); the hub stays off."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text(encoding="utf-8")
FENCE = re.compile(r"^```([a-z]*)\n(.*?)^```$", re.M | re.S)
NUMBER = re.compile(r"[+-]?\d+(?:\.\d+)?(?:e[+-]?\d+)?")

pytestmark = pytest.mark.slow


def blocks() -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2)) for m in FENCE.finditer(README)]


RAY = re.compile(r"--ray\b|-ray/")  # needs a Ray cluster: tests/test_dataset_ray.py runs those commands' code


def demo_commands(block: str) -> list[str]:
    """Shell commands of a ```sh block that use hexray-demo (of a `a && b && hexray ...` chain, the hexray part:
    the venv and pip steps are what this test environment already is), and the files it writes with heredocs."""
    out = []
    lines = iter(block.splitlines())
    for line in lines:
        heredoc = re.search(r"<<'?(\w+)'?\s*$", line)
        if heredoc:  # cat > file <<'EOF' ... EOF: an input file the next commands read
            body = [line]
            for more in lines:
                body.append(more)
                if more.strip() == heredoc.group(1):
                    break
            out.append("\n".join(body))
            continue
        if RAY.search(line):
            continue
        line = re.sub(r"\s+#.*$", "", line).strip()
        for part in (p.strip() for p in line.split("&&")):
            part = re.sub(r"^\.venv/bin/hexray\b", "hexray", part)
            if part.startswith("hexray ") and "hexray-demo" in part:
                out.append(part)
    return out


def examples(block: str) -> list[tuple[str, list[str]]]:
    """`$ command` lines of an output block and the lines shown after each."""
    out: list[tuple[str, list[str]]] = []
    for line in block.splitlines():
        if line.startswith("$ "):
            out.append((line[2:], []))
        elif out:
            out[-1][1].append(line)
    return out


def same_line(got: str, want: str) -> bool:
    """Equal but for the last digits of figures (float16 sums differ a little between CPUs): integers exactly, every
    decimal within a hundredth of its magnitude or two units of its last digit, tiny errors (x.xe-yy) within 10x."""
    got, want = got.rstrip(), want.rstrip()  # trailing blanks (a table title padded to its table) are invisible
    if got == want:
        return True
    loaded = re.compile(r"^hexray: loaded (\S+) in \d+\.\d s; ")  # the load time is the machine's
    if loaded.match(want):
        if not loaded.match(got) or loaded.match(got).group(1) != loaded.match(want).group(1):
            return False
        got, want = loaded.sub("hexray: ", got), loaded.sub("hexray: ", want)
    if want.startswith("hexray: recorded"):  # sizes, times and the kit's hash follow the format, not the model
        def pattern(s):
            return NUMBER.sub("#", re.sub(r"kit [0-9a-f]{12}", "kit #", s.split(" tensors, ")[0] + " tensors"))

        def tail(s):  # "-> path (kit <hash>, cached)": the kit's hash changes with what a kit holds
            return NUMBER.sub("#", re.sub(r"kit [0-9a-f]{12}", "kit #", s.split(" -> ")[1]))

        def head(s):
            return re.match(r"hexray: recorded (\d+) runs?, (\d+) tokens", s).groups()

        return pattern(got).split("tensors")[0] == pattern(want).split("tensors")[0] and head(got) == head(want) \
            and tail(got) == tail(want)
    if NUMBER.sub("#", got) != NUMBER.sub("#", want):
        return False
    for g, w in zip(NUMBER.findall(got), NUMBER.findall(want), strict=True):
        a, b = float(g), float(w)
        if "." not in w and "e" not in w:  # counts, ranks, positions, layer numbers: exact
            ok = g == w
        elif "e" in w:
            ok = abs(b) < 1e-3 and abs(a) < 1e-2 or (a != 0 and 0.1 <= b / a <= 10)
        else:
            unit = 10.0 ** -len(w.split(".")[1]) if "." in w else 1.0
            ok = abs(a - b) <= max(2 * unit, 0.01 * abs(b))
        if not ok:
            return False
    return True


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> tuple[Path, dict]:
    work = tmp_path_factory.mktemp("readme")
    shutil.copytree(REPO / "examples", work / "examples")
    bin_dir = work / "bin"
    bin_dir.mkdir()
    (bin_dir / "hexray").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m hexray "$@"\n')
    (bin_dir / "hexray").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", HEXRAY_CACHE=str(work / "cache"), OMP_NUM_THREADS="1")
    env.pop("COLUMNS", None)
    return work, env


def run(cmd: str, work: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", cmd], cwd=work, env=env, capture_output=True, text=True, timeout=600)


def test_the_readme_runs_as_written(folder):
    work, env = folder
    ran = {"demo": 0, "example": 0, "python": 0}
    for lang, block in blocks():
        if lang == "sh":
            for cmd in demo_commands(block):
                p = run(cmd, work, env)
                assert p.returncode == 0, f"{cmd}\n{p.stderr[-2000:]}"
                ran["demo"] += 1
        elif lang == "python":
            p = subprocess.run([sys.executable, "-c", block], cwd=work, env=env, capture_output=True, text=True,
                               timeout=300)
            assert p.returncode == 0, f"python block failed:\n{block}\n{p.stderr[-2000:]}"
            ran["python"] += 1
        elif lang == "":
            for cmd, shown in examples(block):
                if not cmd.startswith("hexray") or RAY.search(cmd):
                    continue
                p = run(cmd, work, env)
                assert p.returncode == 0, f"{cmd}\n{p.stderr[-2000:]}"
                if "..." in shown:  # progress lines (stderr) first, then the output
                    cut = shown.index("...")
                    for line in shown[:cut]:
                        assert line in p.stderr, f"{cmd}: stderr lacks {line!r}:\n{p.stderr}"
                    shown = shown[cut + 1:]
                got = p.stdout.rstrip("\n").split("\n")
                assert len(got) == len(shown), f"{cmd}: README shows\n" + "\n".join(shown) + "\nbut got\n" + p.stdout
                for g, w in zip(got, shown, strict=True):
                    assert same_line(g, w), f"{cmd}:\n  README: {w}\n  got:    {g}"
                ran["example"] += 1
    assert ran["demo"] >= 6 and ran["example"] >= 7 and ran["python"] >= 1, ran


def test_the_comparison_is_not_blind():
    assert same_line("- MLP  L0 : +5.41 (44.3%)", "- MLP  L0 : +5.40 (44.3%)")
    assert not same_line("- MLP  L0 : +5.60 (44.3%)", "- MLP  L0 : +5.40 (44.3%)")
    assert not same_line("- MLP  L1 : +5.40 (44.3%)", "- MLP  L0 : +5.40 (44.3%)")
    assert same_line("parts + bias +7.8344 vs recorded logit +7.8344: error 3.1e-07",
                     "parts + bias +7.8344 vs recorded logit +7.8344: error 1.5e-07")
    assert not same_line("parts + bias +7.8344 vs recorded logit +7.8344: error 1.5e-02",
                         "parts + bias +7.8344 vs recorded logit +7.8344: error 1.5e-07")
    want = ("hexray: loaded hexray-demo in 9.5 s; recorded 1 run, 30 tokens, 53 tensors, 433.9 KB in 1.9 s -> "
            "letters.hxr (kit 2e49bbd1d5ef, cached)")
    assert same_line(want.replace("433.9 KB in 1.9", "512.0 KB in 0.3").replace("53 t", "61 t"), want)
    assert same_line(want.replace("in 9.5 s", "in 31.0 s"), want)
    assert not same_line(want.replace("hexray-demo", "gpt2"), want)
    assert not same_line(want.replace("30 tokens", "31 tokens"), want)
    assert not same_line(want.replace("letters.hxr", "emma.hxr"), want)
    assert demo_commands("python3 -m venv .venv && .venv/bin/hexray --model hexray-demo --prompt 'x'  # hi\n"
                         "hexray record --model gpt2 -o t.hxr") == ["hexray --model hexray-demo --prompt 'x'"]
    assert demo_commands("cat > p.jsonl <<'EOF'\n{}\nEOF\nhexray record --model hexray-demo -o d/ --ray") == [
        "cat > p.jsonl <<'EOF'\n{}\nEOF"]
