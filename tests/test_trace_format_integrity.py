"""Damaged and hostile `.hxr` files: truncation, byte flips, fuzzing, crafted claims.

The contract: for any file, TraceReader and verify() either work or raise TraceFormatError naming
what is wrong; no other exception escapes, nothing is silently wrong, and refusing a file never
allocates what the file claims.
"""

from __future__ import annotations

import functools
import io
import json
import os
import struct
import subprocess
import sys
import tempfile
import textwrap
import uuid

import msgpack
import numpy as np
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trace_format import WEIGHTS_RUN, TraceFormatError, TraceReader, TraceWriter, layout, verify
from trace_format.codec import pack_obj
from trace_format.layout import KIND_CHUNK, KIND_INDEX, KIND_META, RecordHeader, Trailer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# HXR_FUZZ_EXAMPLES=20000 for a long local run; the default keeps the file well under a minute.
FUZZ = settings(max_examples=int(os.environ.get("HXR_FUZZ_EXAMPLES", 300)), deadline=None,
                suppress_health_check=[HealthCheck.too_slow])


# -- small real traces ------------------------------------------------------------------------

def _write_small(path: str, *, appended: bool) -> bytes:
    """Write a small trace (two runs' worth if appended); return its bytes before any append."""
    rng = np.random.default_rng(7)
    with TraceWriter(path, meta={"model": {"name": "tiny"}}, chunk_bytes=96, threads=2) as w:
        w.begin_run(prompt="héllo", tokens=[1, 2, 3])
        w.write("resid", rng.standard_normal((3, 16)).astype(np.float16))  # zstd + shuffle, 2 chunks
        w.write("ids", np.arange(6, dtype=np.int32))  # stored raw (zstd cannot shrink it)
        w.write("scale", np.float32(1.5))
        w.end_run()
        w.write("kit/b_U", np.ones(4, np.float32), run=WEIGHTS_RUN)
    with open(path, "rb") as f:
        before = f.read()
    if appended:
        with TraceWriter(path, append=True, threads=2) as w:
            w.begin_run(prompt="second")
            w.write("resid", np.zeros((2, 8), np.float16))
    return before


@functools.cache
def _small_pair() -> tuple[bytes, bytes]:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "t.hxr")
        before = _write_small(path, appended=True)
        with open(path, "rb") as f:
            return before, f.read()


def small_trace(appended: bool = False) -> bytes:
    """A small real trace (about 2 KB), optionally with a second run appended to it."""
    return _small_pair()[1 if appended else 0]


def _contents(path: str) -> dict:
    """Everything a reader can read from a trace (raises only TraceFormatError for a bad file)."""
    with TraceReader(path) as r:
        out = {"runs": r.runs, "meta": {k: v for k, v in r.meta.items() if k != "closed"}}
        for t in r.tensors():
            out[(t.run, t.name)] = r.read(t.name, t.run, dtype="stored").tobytes()
            r.read(t.name, t.run)
        r.trailer_chain()
        return out


def _exercise(path: str) -> None:
    """Open, read everything, verify: only TraceFormatError may escape."""
    try:
        _contents(path)
    except TraceFormatError:
        pass
    try:
        verify(path)
    except TraceFormatError:
        pass


@pytest.fixture
def scratch(tmp_path):
    path = str(tmp_path / "x.hxr")

    def put(data: bytes) -> str:
        with open(path, "wb") as f:
            f.write(data)
        return path

    return put


# -- truncation -------------------------------------------------------------------------------

@pytest.mark.slow
def test_truncation_at_every_byte_is_refused(scratch):
    data = small_trace()
    assert len(data) < 4096
    for n in range(len(data)):
        path = scratch(data[:n])
        with pytest.raises(TraceFormatError):
            _contents(path)


@pytest.mark.slow
def test_truncating_an_appended_file_gives_error_or_the_state_before_the_append(scratch):
    old, new = small_trace(False), small_trace(True)
    assert new.startswith(old)
    before = _contents(scratch(old))
    for n in range(len(new)):
        path = scratch(new[:n])
        if n == len(old):  # exactly the file as it was before the append: valid, and the same
            assert _contents(path) == before
            continue
        with pytest.raises(TraceFormatError):
            _contents(path)


# -- byte flips -------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("appended", [False, True])
def test_every_byte_flip_is_detected_by_verify_and_never_read_silently(scratch, appended):
    data = small_trace(appended)
    good = _contents(scratch(data))
    verify(scratch(data))
    for i in range(len(data)):
        for mask in (0xFF, 0x01) if i % 3 == 0 else (0xFF,):  # every byte inverted; one bit on a dense sample
            bad = bytearray(data)
            bad[i] ^= mask
            path = scratch(bytes(bad))
            with pytest.raises(TraceFormatError):
                verify(path)
            try:  # the reader need not notice damage it never reads, but must never return wrong data
                got = _contents(path)
            except TraceFormatError:
                continue
            assert got == good, f"byte {i} ^ {mask:#x} changed what the reader returns without an error"


# -- fuzzing ----------------------------------------------------------------------------------

def _records(data: bytes) -> list[int]:
    """Offsets of every record header (and old trailer) of a valid trace, in file order."""
    trailer = Trailer.unpack(data[-64:], len(data) - 64, "")
    old, link = set(), trailer.prev_trailer
    while link:
        old.add(link)
        link = Trailer.unpack(data[link:link + 64], link, "").prev_trailer
    pos, out = 64, []
    while pos < len(data) - 64:
        if pos in old:
            pos += 64
            continue
        out.append(pos)
        h = RecordHeader.unpack(data[pos:pos + 64], pos, "")
        pos = layout.padded(pos + 64 + h.payload_len)
    return out


_U64 = st.one_of(st.integers(0, 4096), st.integers(0, 2**64 - 1), st.sampled_from([2**31, 2**32, 2**63, 2**64 - 1]))


@st.composite
def mutated(draw):
    data = bytearray(small_trace(draw(st.booleans())))
    how = draw(st.sampled_from(["random", "insert", "delete", "overwrite", "header", "trailer", "index"]))
    if how == "random":
        prefix = draw(st.sampled_from([b"", layout.MAGIC, bytes(data[:64])]))
        return prefix + draw(st.binary(max_size=600))
    if how in ("insert", "delete", "overwrite"):
        at = draw(st.integers(0, len(data)))
        if how == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=80))
        elif how == "delete":
            del data[at:at + draw(st.integers(1, 80))]
        else:
            junk = draw(st.binary(min_size=1, max_size=80))
            data[at:at + len(junk)] = junk
        return bytes(data)
    if how == "header":  # a field of a record header changed, header CRC fixed up: the reader must look deeper
        pos = draw(st.sampled_from(_records(bytes(data))))
        fields = list(struct.unpack("<4sBBBBIIQQQI16s", data[pos:pos + 60]))
        k = draw(st.sampled_from([1, 2, 3, 5, 6, 7, 8, 9, 10]))
        if k in (1, 2, 3):
            fields[k] = draw(st.integers(0, 255))
        elif k in (5, 6):
            fields[k] = draw(st.integers(0, 2**32 - 1))
        elif k == 10:
            fields[k] = draw(st.integers(0, 2**32 - 1))
        else:
            fields[k] = draw(_U64)
        body = struct.pack("<4sBBBBIIQQQI16s", *fields)
        data[pos:pos + 64] = body + struct.pack("<I", layout.crc32(body))
        return bytes(data)
    if how == "trailer":  # trailer fields changed, trailer CRC fixed up
        t = Trailer.unpack(bytes(data[-64:]), 0, "")
        vals = [t.index_offset, t.index_len, t.data_end, t.prev_trailer, t.index_crc]
        k = draw(st.integers(0, 4))
        vals[k] = draw(_U64) if k < 4 else draw(st.integers(0, 2**32 - 1))
        data[-64:] = Trailer(*vals).pack()
        return bytes(data)
    # index: decode, change one thing, re-encode with every checksum right
    t = Trailer.unpack(bytes(data[-64:]), 0, "")
    h = RecordHeader.unpack(bytes(data[t.index_offset:t.index_offset + 64]), 0, "")
    payload = bytes(data[t.index_offset + 64:t.index_offset + 64 + h.payload_len])
    index = msgpack.unpackb(zstandard.ZstdDecompressor().decompress(payload), raw=False)
    tensor = draw(st.sampled_from(index["tensors"]))
    key = draw(st.sampled_from(["shape", "chunk_rows", "dtype", "chunks", "run", "id", "name", "runs", "hxr"]))
    if key == "shape":
        tensor["shape"] = draw(st.lists(_U64, max_size=9))
    elif key == "chunk_rows":
        tensor["chunk_rows"] = draw(_U64)
    elif key == "dtype":
        tensor["dtype"] = draw(st.sampled_from(["f32", "f16", "bf16", "f64", "i8", "bool", "u16", "", "c64"]))
    elif key == "chunks":
        table = bytearray(tensor["chunks"])
        if table and draw(st.booleans()):
            at = draw(st.integers(0, len(table) // 8 - 1)) * 8
            table[at:at + 8] = draw(_U64).to_bytes(8, "little")
        else:
            table += draw(st.binary(max_size=40))
        tensor["chunks"] = bytes(table)
    elif key == "run":
        tensor["run"] = draw(st.integers(-3, 5))
    elif key == "id":
        tensor["id"] = draw(st.integers(-1, 10))
    elif key == "name":
        tensor["name"] = draw(st.sampled_from(["", "x" * 2000, index["tensors"][0]["name"]]))
    elif key == "runs":
        index["runs"] = draw(st.sampled_from([[], [{"id": 1}], None, [{"id": 0}] * 3]))
    else:
        index["hxr"] = draw(st.sampled_from([[1], [1, "0"], [2, 0], None, [1, 99]]))
    raw = msgpack.packb(index, use_bin_type=True)
    new_payload = zstandard.ZstdCompressor(write_checksum=True, write_content_size=True).compress(raw)
    rec = _record(KIND_INDEX, new_payload, codec=1, raw_len=len(raw))
    out = bytes(data[:t.index_offset]) + rec
    return out + Trailer(t.index_offset, 64 + len(new_payload), len(out), t.prev_trailer,
                         layout.crc32(new_payload)).pack()


@FUZZ
@given(data=mutated())
def test_fuzz_only_trace_format_error_escapes(data):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "f.hxr")
        with open(path, "wb") as f:
            f.write(data)
        _exercise(path)


# -- crafted files ----------------------------------------------------------------------------

def _record(kind: int, payload: bytes, *, codec=0, filt=0, ident=0, chunk=0, first_row=0, raw_len=None) -> bytes:
    header = RecordHeader(kind, codec, filt, 0, ident, chunk, len(payload),
                          len(payload) if raw_len is None else raw_len, first_row, layout.crc32(payload))
    rec = header.pack() + payload
    return rec + bytes(layout.padded(len(rec)) - len(rec))


def _zstd(raw: bytes) -> bytes:
    return zstandard.ZstdCompressor(level=1, write_checksum=True, write_content_size=True).compress(raw)


def build(path, tensors=(), *, index_extra=None, index_bytes=None, index_raw_len=None, major=1,
          records_before=()) -> str:
    """Write a trace by hand: ``tensors`` is [(index entry, [chunk record kwargs...])]."""
    buf = bytearray(layout.pack_preamble(uuid.uuid4().bytes))
    if major != 1:
        buf[8:10] = struct.pack("<H", major)
        buf[60:64] = struct.pack("<I", layout.crc32(bytes(buf[:60])))
    buf += _record(KIND_META, pack_obj({"created": "2026-01-01T00:00:00Z"}))
    for rec in records_before:
        buf += rec
    entries = []
    for i, (entry, specs) in enumerate(tensors):
        table = []
        for c, spec in enumerate(specs):
            spec = {"ident": i, "chunk": c, **spec}
            payload = spec.pop("payload")
            raw_len = spec.get("raw_len", len(payload))
            plen = spec.pop("index_payload_len", len(payload))  # what the index claims, if not the truth
            table.append((len(buf), plen, raw_len, layout.crc32(payload)))
            buf += _record(KIND_CHUNK, payload, **spec)
        entries.append({"id": i, "run": 0, "attrs": {}, **entry,
                        "chunks": np.array(table, dtype="<u8").reshape(-1, 4).tobytes()})
    index = {"hxr": [1, 0], "features": [], "meta": {"model": {"name": "crafted"}},
             "runs": [{"id": 0, "status": "complete"}], "tensors": entries, **(index_extra or {})}
    raw = pack_obj(index) if index_bytes is None else index_bytes
    payload = _zstd(raw)
    at = len(buf)
    buf += _record(KIND_INDEX, payload, codec=1, raw_len=len(raw) if index_raw_len is None else index_raw_len)
    buf += Trailer(at, 64 + len(payload), len(buf), 0, layout.crc32(payload)).pack()
    with open(path, "wb") as f:
        f.write(buf)
    return str(path)


def _frame_claiming(size: int) -> bytes:
    """A 17-byte zstd frame whose header claims `size` bytes of content (one 128 KiB RLE block follows)."""
    fhd = 0b11100100  # 8-byte content size, single segment, checksum flag
    block = (1 | (1 << 1) | (131072 << 3)).to_bytes(3, "little") + b"\x00"
    return b"\x28\xb5\x2f\xfd" + bytes([fhd]) + struct.pack("<Q", size) + block


def _real_bomb(size: int) -> bytes:
    buf = io.BytesIO()
    c = zstandard.ZstdCompressor(level=1, write_checksum=True, write_content_size=True)
    with c.stream_writer(buf, size=size, closefd=False) as w:
        zeros = bytes(1 << 20)
        for _ in range(size >> 20):
            w.write(zeros)
    return buf.getvalue()


def _f32_entry(name: str, shape, chunk_rows: int) -> dict:
    return {"name": name, "dtype": "f32", "shape": list(shape), "chunk_rows": chunk_rows}


@pytest.fixture(scope="module")
def crafted(tmp_path_factory):
    d = tmp_path_factory.mktemp("crafted")
    cases = {}

    def case(name, action, expect, **kw):
        path = d / f"{name}.hxr"
        cases[name] = (build(path, **kw) if kw.get("_raw") is None else _put(path, kw["_raw"]), action, expect)

    def _put(path, data):
        path.write_bytes(data)
        return str(path)

    one = {"payload": np.ones(4, np.float32).tobytes()}
    case("huge_shape_one_chunk", "open", "claims chunks of",
         tensors=[(_f32_entry("x", [2**40, 2**40], 2**40), [one])])
    case("huge_shape_few_chunks", "open", "expected",
         tensors=[(_f32_entry("x", [2**40, 2**40, 4], 1), [one])])
    case("too_many_axes", "open", "bad shape", tensors=[(_f32_entry("x", [1] * 9, 1), [one])])
    case("huge_chunk_in_index", "open", "over the limit",
         tensors=[(_f32_entry("x", [1, 2**25], 1), [{"payload": b"\0" * 64, "raw_len": 2**27}])])
    case("chunk_claims_1TiB_stored", "open", "chunk position or length out of bounds",
         tensors=[(_f32_entry("x", [1, 4], 1), [{"payload": b"\0" * 16, "index_payload_len": 2**40}])])
    case("chunk_runs_past_data", "open", "chunk runs past the data",
         tensors=[(_f32_entry("x", [1, 4], 1), [{"payload": b"\0" * 16, "index_payload_len": 1000}])])
    case("frame_claims_2GiB", "read:x", "zstd frame claims 2147483648 bytes, index says 256",
         tensors=[(_f32_entry("x", [1, 64], 1), [{"payload": _frame_claiming(2**31), "codec": 1, "raw_len": 256}])])
    case("frame_claims_32MiB_index_agrees", "open", "out of bounds",  # 17 bytes cannot hold 32 MiB of zstd
         tensors=[(_f32_entry("x", [1, 2**23], 1), [{"payload": _frame_claiming(2**25), "codec": 1,
                                                     "raw_len": 2**25}])])
    bomb = _real_bomb(256 << 20)
    case("bomb_256MiB_in_1MiB_chunk", "read:x", "zstd frame claims 268435456 bytes, index says 1048576",
         tensors=[(_f32_entry("x", [1, 2**18], 1), [{"payload": bomb, "codec": 1, "raw_len": 2**20}])])
    case("index_record_claims_1TiB", "open", "INDEX record claims 1099511627776 bytes", index_raw_len=2**40)
    case("msgpack_ext_type", "open", "ext type 5",
         index_bytes=msgpack.packb({"hxr": [1, 0], "meta": msgpack.ExtType(5, b"x")}))
    case("msgpack_timestamp", "open", "Timestamp",
         index_bytes=msgpack.packb({"hxr": [1, 0], "meta": {"created": msgpack.Timestamp(0)}}, datetime=False))
    case("msgpack_bytes_key", "open", "key that is not a str",
         index_bytes=msgpack.packb({"hxr": [1, 0], "meta": {b"raw": 1}}, use_bin_type=True))
    case("deep_nesting", "open", "malformed msgpack", index_bytes=b"\x91" * 100_000 + b"\xc0")
    case("huge_array_claim", "open", "malformed msgpack", index_bytes=b"\xdd\xff\xff\xff\xff")
    case("unknown_major_preamble", "open", "file is .hxr v2, this HexRay reads v1", major=2)
    case("unknown_major_index", "open", "file is .hxr v2", index_extra={"hxr": [2, 0]})
    case("unknown_feature", "open", "needs feature(s) this HexRay does not know: 'chunk-grid'",
         index_extra={"features": ["chunk-grid"]})
    case("unknown_critical_kind", "verify", "unknown critical record kind 0xc4",
         records_before=[_record(0xC4, b"from the future")])
    case("wrong_magic_zip", "open", "bad magic", _raw=b"PK\x03\x04" + bytes(300))
    case("wrong_magic_text", "open", "bad magic", _raw=b"hello, this is a text file\n" * 10)
    case("empty_file", "open", "not an .hxr trace", _raw=b"")
    return cases


_PROBE = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, sys.argv[1])
    from trace_format import TraceFormatError, TraceReader, verify

    def peak():  # VmPeak / VmHWM of this process image (ru_maxrss would include the parent's, from before exec)
        status = {l.split(":")[0]: l.split()[1] for l in open("/proc/self/status") if l.startswith("Vm")}
        return int(status["VmPeak"]), int(status["VmHWM"])

    with TraceReader(sys.argv[2]) as r:  # warm up every code path on a good file first
        for t in r.tensors():
            r.read(t.name, t.run)
    verify(sys.argv[2])
    out = {}
    for name, path, action in json.loads(sys.stdin.read()):
        vm0, rss0 = peak()
        try:
            if action == "verify":
                verify(path)
            else:
                with TraceReader(path) as r:
                    if action.startswith("read:"):
                        r.read(action[5:])
            msg, kind = None, None
        except TraceFormatError as e:
            msg, kind = str(e), "TraceFormatError"
        except BaseException as e:
            msg, kind = f"{type(e).__name__}: {e}", type(e).__name__
        vm1, rss1 = peak()
        out[name] = {"error": msg, "type": kind, "vm_kb": vm1 - vm0, "rss_kb": rss1 - rss0}
    if len(sys.argv) > 3:  # control: what python-zstandard does with the same frames, unguarded
        import zstandard
        for name, path in json.loads(sys.argv[3]):
            frame = open(path, "rb").read()
            vm0, rss0 = peak()
            try:
                n = len(zstandard.ZstdDecompressor().decompress(frame, max_output_size=1 << 20))
            except Exception as e:
                n = f"{type(e).__name__}"
            vm1, rss1 = peak()
            out["control:" + name] = {"result": n, "vm_kb": vm1 - vm0, "rss_kb": rss1 - rss0}
    print(json.dumps(out))
""")


def test_crafted_files_are_refused_by_name_without_allocating(crafted, tmp_path):
    good = str(tmp_path / "good.hxr")
    _write_small(good, appended=True)
    frames = []
    for name, size in (("claims_2GiB", None), ("bomb_256MiB", 256 << 20)):
        p = tmp_path / f"{name}.zst"
        p.write_bytes(_frame_claiming(2**31) if size is None else _real_bomb(size))
        frames.append((name, str(p)))
    jobs = [(name, path, action) for name, (path, action, _) in crafted.items()]
    proc = subprocess.run([sys.executable, "-c", _PROBE, REPO, good, json.dumps(frames)], input=json.dumps(jobs),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    for name, (_path, _action, expect) in crafted.items():
        res = out[name]
        assert res["type"] == "TraceFormatError", (name, res)
        assert expect in res["error"], (name, res["error"])
        # Refusing allocated nothing the file claimed: no peak above 32 MiB (claims were 256 MiB to 2**80 B).
        assert res["vm_kb"] < 32 * 1024 and res["rss_kb"] < 32 * 1024, (name, res)
    # The controls prove the guard matters: unguarded, python-zstandard reserves what a 17-byte frame
    # claims, and decodes all of a 256 MiB bomb although max_output_size is 1 MiB.
    assert out["control:claims_2GiB"]["vm_kb"] > 1024 * 1024, out["control:claims_2GiB"]
    assert out["control:bomb_256MiB"]["result"] == 256 << 20
    assert out["control:bomb_256MiB"]["rss_kb"] > 250 * 1024


def test_unknown_ancillary_record_kind_is_skipped(tmp_path):
    path = build(tmp_path / "a.hxr", tensors=[(_f32_entry("x", [1, 4], 1), [{"payload": bytes(16)}])],
                 records_before=[_record(0x44, b"a future, optional record")])
    report = verify(path)
    assert report.records["kind 0x44"] == 1 and report.chunks == 1
    with TraceReader(path) as r:
        assert r.read("x").tolist() == [[0, 0, 0, 0]]


def test_crafted_builder_makes_valid_files(tmp_path):
    """The hand builder above writes what the spec says: a real reader accepts its output."""
    x = np.arange(8, dtype=np.float32)
    path = build(tmp_path / "ok.hxr", tensors=[(_f32_entry("x", [2, 4], 1), [
        {"payload": x[:4].tobytes()}, {"payload": _zstd(x[4:].tobytes()), "codec": 1, "raw_len": 16, "first_row": 1},
    ])])
    verify(path)
    with TraceReader(path) as r:
        np.testing.assert_array_equal(r.read("x"), x.reshape(2, 4))


def test_trailing_data_after_a_zstd_frame_is_refused(tmp_path):
    x = np.arange(64, dtype=np.float32).tobytes()
    path = build(tmp_path / "t.hxr", tensors=[(_f32_entry("x", [1, 64], 1), [
        {"payload": _zstd(x) + b"hidden", "codec": 1, "raw_len": 256}])])
    with TraceReader(path) as r, pytest.raises(TraceFormatError, match="unused data"):
        r.read("x")
    path = build(tmp_path / "u.hxr", tensors=[(_f32_entry("x", [1, 64], 1), [
        {"payload": zstandard.ZstdCompressor(write_checksum=False).compress(x), "codec": 1, "raw_len": 256}])])
    with TraceReader(path) as r, pytest.raises(TraceFormatError, match="without content checksum"):
        r.read("x")


def test_not_a_trace_errors(tmp_path):
    with pytest.raises(TraceFormatError, match="no such file"):
        TraceReader(tmp_path / "missing.hxr")
    with pytest.raises(TraceFormatError, match="directory"):
        TraceReader(tmp_path)
    (tmp_path / "short.hxr").write_bytes(layout.MAGIC[:5])
    with pytest.raises(TraceFormatError, match="truncated"):
        TraceReader(tmp_path / "short.hxr")
    (tmp_path / "junk.hxr").write_bytes(small_trace() + b"junk")
    with pytest.raises(TraceFormatError, match="no trailer"):
        TraceReader(tmp_path / "junk.hxr")
