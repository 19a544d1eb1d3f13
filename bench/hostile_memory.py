"""Peak memory of every tool on small hostile files, beside an honest recording of the same size class.

    python bench/hostile_memory.py [--against OTHER_CHECKOUT]

Builds the crafted files of tests/test_hostile_memory.py (valid containers of a few KB that claim
40 MB of nils, a million empty maps, 300,000 empty tensors, a 1 GiB tensor, a 768 MiB final-norm
scale, a 64 MiB chunk read for one row, 100,000 runs), records an honest demo trace of ~500 tokens,
and runs `verify`, `info`, `replay` and `hexray.open` + one tensor read on each in a fresh process,
printing its peak RSS (VmHWM) in MB. The promise (SPEC.md 10.1): under 100 MB on any file under 10 MB.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), os.path.join(os.path.dirname(HERE), "tests")]

import hostile_support  # noqa: E402
from hostile_support import hexray, peak_rss_mb  # noqa: E402
from test_hostile_memory import OPEN_AND_READ, _frames, craft  # noqa: E402

CLI = "import sys; from hexray.cli.main import main; sys.exit(main(sys.argv[1:]))"


def main() -> None:
    """``--against DIR``: run the tools of another checkout (e.g. the code before these limits) on the same files."""
    if "--against" in sys.argv:
        hostile_support.REPO = os.path.abspath(sys.argv[sys.argv.index("--against") + 1])
    d = tempfile.mkdtemp(prefix="hxr-hostile-")
    mib64 = 64 << 20
    cfg = {"model": {"name": "x", "config": {"n_layers": 1, "d_model": 4}}}
    files = {
        "index of 40 MB nils": craft(f"{d}/nils.hxr", meta={"junk": [None] * 40_000_000}),
        "1M empty maps": craft(f"{d}/maps.hxr", meta={"junk": [{}] * 1_000_000}),
        "300k empty tensors": craft(f"{d}/empty.hxr",
                                    tensors=[(f"t{i}", 0, "f32", [0], 1, []) for i in range(300_000)]),
        "1 GiB tensor": craft(f"{d}/gib.hxr", meta=cfg, tensors=[("hook_embed", 0, "f32", [16, mib64 // 4], 1,
                                                                 _frames(mib64, 16))]),
        "768 MiB scale": craft(f"{d}/scale.hxr", meta=cfg, tensors=[("ln_final.hook_scale", 0, "f32",
                                                                     [12 * mib64 // 4, 1], mib64 // 4,
                                                                     _frames(mib64, 12))]),
        "1 row of 64 MiB": craft(f"{d}/row.hxr", tensors=[("x", 0, "f32", [16, mib64 // 64], 16, _frames(mib64, 1))]),
        "100k runs": craft(f"{d}/runs.hxr", runs=[{"id": i, "status": "complete"} for i in range(100_000)]),
    }
    words = "the of and to in is was for on that with as by at from it his an were are which this be or".split()
    prompt = " ".join(words[(i * 7) % len(words)] for i in range(450))
    honest = f"{d}/honest.hxr"
    res = hexray("record", "--model", "hexray-demo", "--prompt", prompt, "-o", honest, "-q", timeout=600)
    assert res.returncode == 0, res.stderr
    files["honest demo trace (500 tokens)"] = honest
    baseline, _ = peak_rss_mb("import hexray.cli.main, trace_format")
    print(f"tools of {hostile_support.REPO}")
    print(f"peak RSS in MB (VmHWM, fresh process; interpreter + numpy + msgpack + zstd alone: {baseline:.0f} MB)")
    print(f"{'file':32} {'size':>9} {'verify':>7} {'info':>6} {'replay':>7} {'open+read':>10}")
    for name, path in files.items():
        row = [_peak(CLI, tool, path) for tool in ("verify", "info", "replay")] + [_peak(OPEN_AND_READ, path)]
        print(f"{name:32} {os.path.getsize(path):>9,} " + " ".join(f"{v:>7}" for v in row[:3]) + f" {row[3]:>10}")


def _peak(code: str, *args: str) -> str:
    try:
        return f"{peak_rss_mb(code, *args, timeout=120)[0]:.0f}"
    except subprocess.TimeoutExpired:
        return ">120s"


if __name__ == "__main__":
    main()
