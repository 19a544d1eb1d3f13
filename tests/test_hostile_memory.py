"""Small files that claim a lot: every tool stays under 100 MB of peak memory (measured in a subprocess).

Each file below is a valid container (every CRC right) of at most a few hundred kilobytes, built
byte by byte from SPEC.md where the writer would refuse to make it: an index or metadata that
decompresses to megabytes of nils or a million empty maps, 300,000 empty tensors, a 1 GiB tensor
in 16 zstd frames, a 768 MiB final-norm scale, a single 64 MiB chunk read for one row, 100,000
runs. `verify`, `info`, `replay` and `hexray.open` + one tensor read each get one line (or, for
`info`, a summary; for `verify` of a file whose only fault is that its tensors are huge zeros, an OK:
such a container is valid, SPEC.md 10.1) and never more than 100 MB. A direct `TraceReader.read` is
bounded by the caller's memory budget (`Limits.read_budget_bytes`), not by a compression ratio.
"""

from __future__ import annotations

import os
import uuid

import msgpack
import numpy as np
import pytest
import zstandard
from hostile_support import hexray, peak_rss_mb

from trace_format import Limits, TraceFormatError, TraceReader, verify
from trace_format.layout import KIND_CHUNK, KIND_INDEX, KIND_META, RecordHeader, Trailer, crc32, pack_preamble, padded

LIMIT_MB = 100


def _record(kind: int, payload: bytes, *, codec=0, raw_len=None, ident=0, chunk=0, first_row=0) -> bytes:
    header = RecordHeader(kind, codec, 0, 0, ident, chunk, len(payload), len(payload) if raw_len is None else raw_len,
                          first_row, crc32(payload))
    body = header.pack() + payload
    return body + bytes(padded(len(body)) - len(body))


def _zstd(raw: bytes) -> bytes:
    return zstandard.ZstdCompressor(level=19, write_checksum=True, write_content_size=True).compress(raw)


def craft(path, *, meta=None, runs=None, tensors=(), meta_raw: bytes | None = None) -> str:
    """A trace from parts: ``tensors`` are (name, run, dtype, shape, chunk_rows, [(payload, raw_len, codec)])."""
    out = bytearray(pack_preamble(uuid.uuid4().bytes))
    meta_bytes = meta_raw if meta_raw is not None else msgpack.packb(meta or {}, use_bin_type=True)
    z = _zstd(meta_bytes)
    out += _record(KIND_META, z, codec=1, raw_len=len(meta_bytes))
    entries = []
    for i, (name, run, dtype, shape, chunk_rows, chunks) in enumerate(tensors):
        table = []
        for c, (payload, raw_len, codec) in enumerate(chunks):
            at = len(out)
            out += _record(KIND_CHUNK, payload, codec=codec, raw_len=raw_len, ident=i, chunk=c,
                           first_row=c * chunk_rows)
            table.append((at, len(payload), raw_len, crc32(payload)))
        entries.append({"id": i, "run": run, "name": name, "dtype": dtype, "shape": list(shape),
                        "chunk_rows": chunk_rows, "chunks": np.asarray(table, "<u8").reshape(-1, 4).tobytes(),
                        "attrs": {}})
    index = {"hxr": [1, 0], "features": [], "meta": (meta or {}) if meta_raw is None else msgpack.unpackb(meta_raw),
             "runs": runs if runs is not None else [{"id": 0, "status": "complete", "tokens": [1, 2, 3]}],
             "tensors": entries}
    raw = msgpack.packb(index, use_bin_type=True)
    payload = _zstd(raw)
    index_at = len(out)
    out += _record(KIND_INDEX, payload, codec=1, raw_len=len(raw))
    out += Trailer(index_at, 64 + len(payload), len(out), 0, crc32(payload)).pack()
    with open(path, "wb") as f:
        f.write(out)
    return str(path)


def _frames(raw_len: int, n: int):
    payload = _zstd(bytes(raw_len))
    return [(payload, raw_len, 1)] * n


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile-memory")
    cfg = {"model": {"name": "x", "config": {"n_layers": 1, "d_model": 4}}}
    mib64 = 64 << 20
    out = {
        # an INDEX whose meta decompresses to 40 MB of nils
        "index-nils": craft(d / "nils.hxr", meta={"junk": [None] * 40_000_000}),
        # a META/INDEX just under the byte cap, holding a million empty maps (64 MB of Python objects)
        "empty-maps": craft(d / "maps.hxr", meta={"junk": [{}] * 1_000_000}),
        # 300,000 empty tensors (no chunks at all)
        "empty-tensors": craft(d / "empty.hxr", tensors=[(f"t{i}", 0, "f32", [0], 1, []) for i in range(300_000)]),
        # a 1 GiB tensor in 16 chunks of 64 MiB zeros, a few KB each
        "gib-tensor": craft(d / "gib.hxr", meta=cfg, tensors=[("hook_embed", 0, "f32", [16, mib64 // 4], 1,
                                                               _frames(mib64, 16))]),
        # a 768 MiB final-norm scale [n, 1] (12 chunks of 64 MiB)
        "scale-768m": craft(d / "scale.hxr", meta=cfg, tensors=[("ln_final.hook_scale", 0, "f32",
                                                                 [12 * mib64 // 4, 1], mib64 // 4,
                                                                 _frames(mib64, 12))]),
        # one 64 MiB chunk, of which a single row is read
        "one-row-of-64m": craft(d / "row.hxr", tensors=[("x", 0, "f32", [16, mib64 // 64], 16,
                                                         _frames(mib64, 1))]),
        # 100,000 runs
        "100k-runs": craft(d / "runs.hxr", runs=[{"id": i, "status": "complete"} for i in range(100_000)]),
    }
    for path in out.values():
        assert os.path.getsize(path) < 10 << 20
    return out


OPEN_AND_READ = """
import sys, hexray
from hexray_core.errors import HexRayError
from trace_format import Limits, TraceFormatError, TraceReader
budget = {"read_budget_bytes": 32 << 20} if "read_budget_bytes" in Limits.__dataclass_fields__ else {}  # (older)
try:
    with TraceReader(sys.argv[1], limits=Limits(**budget)) as r:  # the caller's memory budget
        infos = r.tensors()
        if infos:
            r.read(infos[0].name, infos[0].run, index=(0,) if len(infos[0].shape) > 1 else ())
    hexray.open(sys.argv[1])
except (HexRayError, TraceFormatError) as e:
    print("refused:", e)
"""


VALID_CONTAINERS = {"gib-tensor", "scale-768m", "one-row-of-64m"}  # well-formed zeros: verify says OK


@pytest.mark.parametrize("case", ["index-nils", "empty-maps", "empty-tensors", "gib-tensor", "scale-768m",
                                  "one-row-of-64m", "100k-runs"])
def test_small_hostile_files_stay_under_100_mb(files, case):
    path = files[case]
    for tool in ("verify", "info", "replay"):
        mb, res = peak_rss_mb("import sys; from hexray.cli.main import main; sys.exit(main(sys.argv[1:]))",
                              tool, path)
        assert mb < LIMIT_MB, (case, tool, mb)
        assert "Traceback" not in res.stderr, res.stderr
        if tool == "verify" and case in VALID_CONTAINERS:  # decoded in pieces, every checksum checked
            assert res.returncode == 0 and res.stdout.startswith("OK"), (res.stdout, res.stderr)
        elif tool != "info":
            assert res.returncode == 1 and len(res.stderr.strip().splitlines()) == 2, res.stderr  # + PEAK line
    mb, res = peak_rss_mb(OPEN_AND_READ, path)
    assert mb < LIMIT_MB and "Traceback" not in res.stderr, (case, mb, res.stderr)
    assert "refused:" in res.stdout, res.stdout
    print(case, res.stdout.strip())


def test_the_refusals_name_the_limit_and_a_caller_may_raise_it(files):
    with pytest.raises(TraceFormatError, match="msgpack items, over the limit for a file of this size"):
        TraceReader(files["empty-maps"])
    generous = Limits(items_slack=3_000_000, index_slack_bytes=64 << 20)
    with TraceReader(files["empty-maps"], limits=generous) as r:  # the claim itself is well formed
        assert len(r.meta["junk"]) == 1_000_000
    with pytest.raises(TraceFormatError, match="claims 40000081 bytes, over the limit"):
        TraceReader(files["index-nils"])
    with TraceReader(files["gib-tensor"]) as r:  # 1 GiB and one 64 MiB chunk: within the default budget
        assert r.limits.result_cap(r.size) == 4 << 30
    with TraceReader(files["gib-tensor"], limits=Limits(read_budget_bytes=512 << 20)) as r:
        with pytest.raises(TraceFormatError, match=r"a read costing 1,140,850,688 bytes is over the limit of "
                                                   r"536,870,912 \(the memory budget"):
            r.read("hook_embed")
        assert r.read("hook_embed", index=(3,)).shape == (16 << 20,)  # a row fits the budget
    assert verify(files["one-row-of-64m"]).raw_bytes == 64 << 20


@pytest.mark.slow  # the CLI in a subprocess that records (imports torch): the slow tier
def test_real_recordings_pass_the_relative_limits(tmp_path):
    """A long prompt's attention patterns compress ~3x; the caps leave them room."""
    words = ("the of and to in is was for on that with as by at from it his an were are which this be or has had "
             "not but also first one their its new after who they have two her she been other when there").split()
    rng = np.random.default_rng(0)
    prompt = " ".join(rng.choice(words, 400))
    path = tmp_path / "long.hxr"
    res = hexray("record", "--model", "hexray-demo", "--prompt", prompt, "-o", path, "-q", timeout=300)
    assert res.returncode == 0, res.stderr
    assert verify(path).chunks > 0
    with TraceReader(path) as r:
        for t in r.tensors():
            r.read(t.name, t.run)
    mb, res = peak_rss_mb("import sys; from hexray.cli.main import main; sys.exit(main(sys.argv[1:]))",
                          "replay", str(path), "--cot")
    assert res.returncode == 0 and mb < LIMIT_MB, (mb, res.stderr)


def test_item_budget_counts_containers(tmp_path):
    from trace_format.codec import unpack_obj

    data = msgpack.packb([{}] * 1000)
    with pytest.raises(TraceFormatError, match="msgpack items"):
        unpack_obj(data, "x", max_items=1500)
    assert len(unpack_obj(data, "x", max_items=2001)) == 1000

