"""Round trips of the `.hxr` container: shapes, dtypes, chunking, runs, row ranges, appends, read modes."""

from __future__ import annotations

import math
import os
import tempfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trace_format import WEIGHTS_RUN, TraceFormatError, TraceReader, TraceWriter, verify
from trace_format.dtypes import bf16_to_f32, f32_to_bf16

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

DTYPES = {
    "f32": np.float32, "f16": np.float16, "f64": np.float64, "bf16": np.uint16,
    "i64": np.int64, "i32": np.int32, "i16": np.int16, "i8": np.int8, "u8": np.uint8, "bool": np.bool_,
}


def _make(tag: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if tag == "bool":
        return rng.random(shape) < 0.5
    if tag == "bf16":
        return f32_to_bf16(rng.standard_normal(shape).astype(np.float32) * 10)
    dt = np.dtype(DTYPES[tag])
    if dt.kind == "f":
        x = (rng.standard_normal(shape) * 10).astype(dt)
        if x.size:  # special values survive bit-exactly
            flat = x.reshape(-1)
            flat[0] = np.nan if x.size > 1 else flat[0]
            flat[-1] = -0.0
        return x
    info = np.iinfo(dt)
    return rng.integers(info.min, info.max, size=shape, dtype=dt, endpoint=True)


def _same_bits(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


def _as_float32(x: np.ndarray, tag: str) -> np.ndarray:
    if tag == "bf16":
        return bf16_to_f32(x)
    if tag in ("f32", "f16", "f64"):
        return x.astype(np.float32)
    return x


def _noncontiguous(x: np.ndarray, how: int) -> np.ndarray:
    """The same values, laid out differently in memory (the writer must copy them correctly)."""
    if how == 0 or x.ndim == 0:
        return x
    if how == 1:  # a strided view of a bigger buffer
        big = np.repeat(x[..., None], 2, axis=-1)
        return big[..., 0]
    if how == 2 and x.ndim >= 2:  # Fortran order
        return np.asfortranarray(x)
    if how == 3:  # a reversed view
        return x[::-1][::-1] if x.ndim else x
    return x


shapes = st.lists(st.integers(0, 6), min_size=0, max_size=4).map(tuple)
chunk_sizes = st.sampled_from([1, 2, 7, 64, 100, 4096, 1 << 20])
levels = st.sampled_from([None, 1, 3])


def _leading_index(shape: tuple[int, ...], draw_ints: list[int], use_slice: bool, s0: int, s1: int):
    """An index of leading-axis integers plus an optional final slice, valid for shape."""
    lead = shape[:-1] if len(shape) >= 2 else shape
    ix = []
    for axis, n in enumerate(lead):
        if axis >= len(draw_ints) or n == 0:
            break
        ix.append(draw_ints[axis] % n - (n if draw_ints[axis] % 2 else 0))  # negative indices too
    if use_slice and len(ix) < len(lead):
        ix.append(slice(s0, s1))
    return tuple(ix)


@SETTINGS
@given(
    tensors=st.lists(
        st.tuples(st.sampled_from(sorted(DTYPES)), shapes, st.integers(0, 3), st.integers(0, 2**31)),
        min_size=1, max_size=5,
    ),
    chunk_bytes=chunk_sizes,
    level=levels,
    shuffle=st.booleans(),
    ix=st.tuples(st.lists(st.integers(0, 50), max_size=3), st.booleans(), st.integers(-8, 8), st.integers(-8, 8)),
)
def test_round_trip(tensors, chunk_bytes, level, shuffle, ix):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "t.hxr")
        originals = {}
        with TraceWriter(path, meta={"model": {"name": "m"}}, level=level, shuffle=shuffle, chunk_bytes=chunk_bytes,
                         threads=2) as w:
            w.begin_run(prompt="p", tokens=[1, 2])
            for i, (tag, shape, layout, seed) in enumerate(tensors):
                x = _make(tag, shape, seed)
                originals[f"t{i}"] = (tag, x)
                w.write(f"t{i}", _noncontiguous(x, layout), dtype="bf16" if tag == "bf16" else None)
            w.end_run()
        with TraceReader(path) as r:
            assert r.names(0) == list(originals)
            for name, (tag, x) in originals.items():
                info = r.info(name)
                assert info.dtype == tag and info.shape == x.shape and info.nbytes == x.nbytes
                stored = r.read(name, dtype="stored")
                assert _same_bits(stored, x), name
                f32 = r.read(name)
                expect = _as_float32(x, tag)
                assert f32.dtype == expect.dtype and f32.shape == x.shape
                np.testing.assert_array_equal(f32, expect)
                index = _leading_index(x.shape, *ix)
                part = r.read(name, index=index, dtype="stored")
                assert _same_bits(part, x[index]), (name, x.shape, index)
                part32 = r.read(name, index=index)  # a span of one chunk is un-shuffled alone (codec.decode)
                np.testing.assert_array_equal(part32, expect[index])
                assert part.flags.writeable and part32.flags.writeable
        report = verify(path)
        assert report.tensors == len(tensors)
        assert report.chunks == sum(len(t.chunks) for t in TraceReader(path).tensors())


@SETTINGS
@given(
    runs=st.lists(st.lists(st.tuples(st.integers(1, 40), st.integers(1, 9)), min_size=0, max_size=4), min_size=1,
                  max_size=6),
    appends=st.lists(st.integers(1, 3), min_size=0, max_size=3),
    chunk_bytes=chunk_sizes,
)
def test_many_runs_and_appends(runs, appends, chunk_bytes):
    """Runs written at once and runs appended later all read back, with their info and tensors."""
    rng = np.random.default_rng(0)
    expected: dict[tuple[int, str], np.ndarray] = {}
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "t.hxr")

        def add_runs(w, specs):
            for spec in specs:
                run = w.begin_run(prompt=f"prompt {len(expected)}", tokens=list(range(len(spec))))
                for j, (n, m) in enumerate(spec):
                    x = rng.standard_normal((n, m)).astype(np.float16)
                    w.write(f"blocks.{j}.hook_resid_post", x)
                    expected[(run, f"blocks.{j}.hook_resid_post")] = x
                w.end_run(n_tokens=len(spec))

        with TraceWriter(path, meta={"created": "then"}, chunk_bytes=chunk_bytes, threads=2) as w:
            add_runs(w, runs)
            w.write("kit/W_U", np.arange(12, dtype=np.float32).reshape(3, 4), run=WEIGHTS_RUN)
        n_runs = len(runs)
        for k, extra in enumerate(appends):
            with TraceWriter(path, append=True, meta={"appended": k}, threads=2) as w:
                add_runs(w, [[(3, 2)]] * extra)
            n_runs += extra
        with TraceReader(path) as r:
            assert len(r.runs) == n_runs
            assert [run["id"] for run in r.runs] == list(range(n_runs))
            assert all(run["status"] == "complete" for run in r.runs)
            assert r.meta["created"] == "then"
            assert r.appends == len(appends)
            if appends:
                assert r.meta["appended"] == len(appends) - 1
            for (run, name), x in expected.items():
                np.testing.assert_array_equal(r.read(name, run=run, dtype="stored"), x)
                assert r.runs[run]["prompt"].startswith("prompt")
            np.testing.assert_array_equal(r.read("kit/W_U", run=WEIGHTS_RUN), np.arange(12).reshape(3, 4))
            assert r.names(WEIGHTS_RUN) == ["kit/W_U"]
        report = verify(path)
        assert report.appends == len(appends)
        assert report.records["INDEX"] == 1 + len(appends)


def test_row_ranges_decode_only_needed_chunks(tmp_path, monkeypatch):
    path = tmp_path / "attn.hxr"
    pattern = np.random.default_rng(1).random((12, 64, 64)).astype(np.float16)  # 8 KiB per head
    with TraceWriter(path, chunk_bytes=4096) as w:
        w.begin_run()
        w.write("blocks.0.attn.hook_pattern", pattern)
    with TraceReader(path) as r:
        info = r.info("blocks.0.attn.hook_pattern")
        assert info.chunk_rows == 32 and len(info.chunks) == 24
        seen = []
        real = r._read_chunk
        monkeypatch.setattr(r, "_read_chunk",
                            lambda info, c, out=None, span=None: seen.append(c) or real(info, c, out=out, span=span))
        row = r.read("blocks.0.attn.hook_pattern", index=(3, slice(40, 41)))
        assert row.shape == (1, 64) and seen == [7]
        np.testing.assert_array_equal(row, pattern[3, 40:41].astype(np.float32))
        seen.clear()
        np.testing.assert_array_equal(r.read("blocks.0.attn.hook_pattern", index=(5,)), pattern[5])
        assert seen == [10, 11]
        seen.clear()
        np.testing.assert_array_equal(r.read("blocks.0.attn.hook_pattern", index=(-1, -1)), pattern[-1, -1])
        np.testing.assert_array_equal(r.read("blocks.0.attn.hook_pattern", index=slice(2, 4)), pattern[2:4])
        assert r.read("blocks.0.attn.hook_pattern", index=(0, slice(10, 5))).shape == (0, 64)


def test_read_argument_errors_are_not_format_errors(tmp_path):
    """A caller's mistake raises the usual Python error, never TraceFormatError (which means a bad file)."""
    path = tmp_path / "t.hxr"
    with TraceWriter(path) as w:
        w.begin_run()
        w.write("x", np.zeros((4, 3, 2), np.float32))
    with TraceReader(path) as r:
        with pytest.raises(KeyError):
            r.read("nope")
        with pytest.raises(KeyError):
            r.read("x", run=5)
        with pytest.raises(IndexError):
            r.read("x", index=(4,))
        with pytest.raises(IndexError):
            r.read("x", index=(0, 0, 0))  # the last axis cannot be indexed
        with pytest.raises(IndexError):
            r.read("x", index=(slice(0, 2), 0))
        with pytest.raises(IndexError):
            r.read("x", index=slice(0, 4, 2))
        with pytest.raises(TypeError):
            r.read("x", index=("a",))
        with pytest.raises(TypeError):
            r.read("x", index=(1.5,))
        with pytest.raises(ValueError):
            r.read("x", dtype="float16")
        assert "x" in r and (0, "x") in r and "y" not in r


def test_writer_dtype_rules(tmp_path):
    path = tmp_path / "t.hxr"
    x = np.array([[1.5, -2.25], [131072.0, 3.0]], dtype=np.float32)
    with TraceWriter(path) as w:
        w.begin_run()
        with pytest.raises(ValueError, match="overflow float16"):
            w.write("too_big", x, dtype="f16")
        w.write("as_bf16", x, dtype="bf16")  # floats are converted, round to nearest even
        w.write("words", f32_to_bf16(x), dtype="bf16")
        w.write("narrow", x[:, :1] / 4, dtype="f16")
        w.write("big_endian", x.astype(">f4"))
        with pytest.raises(TypeError):
            w.write("u16", np.zeros(3, np.uint16))  # ambiguous: bf16 words must be tagged
        with pytest.raises(TypeError):
            w.write("c64", np.zeros(3, np.complex64))
        with pytest.raises(TypeError):
            w.write("b", np.zeros(3, np.int32), dtype="bf16")
        with pytest.raises(ValueError, match="unknown dtype"):
            w.write("q", x, dtype="f8")
        with pytest.raises(ValueError, match="already written"):
            w.write("narrow", x)
        with pytest.raises(TypeError, match="cannot be stored"):
            w.write("bad_attrs", x, attrs={"a": object()})
        with pytest.raises(TypeError, match="cannot be stored"):
            w.update_run(tokens=np.arange(3))  # numpy arrays are not msgpack: caught now, not at close()
    with TraceReader(path) as r:
        assert not r.has("too_big")
        np.testing.assert_array_equal(r.read("as_bf16"), x)  # these values are exact in bf16
        assert r.info("as_bf16").dtype == "bf16" and r.read("as_bf16", dtype="stored").dtype == np.uint16
        np.testing.assert_array_equal(r.read("words", dtype="stored"), f32_to_bf16(x))
        assert r.read("narrow", dtype="stored").dtype == np.float16
        assert r.info("big_endian").dtype == "f32"
        np.testing.assert_array_equal(r.read("big_endian"), x)


def _bf16_reference(bits: int) -> int:
    """Round one finite float32 (given by its bits) to bfloat16 the slow way: of the two bf16 values
    around it pick the nearer, ties to the even word (exact: float64 holds every value involved)."""
    x = float(np.array([bits], np.uint32).view(np.float32)[0])
    lo = bits >> 16  # truncation: same sign, magnitude just below or equal
    hi = lo + 1

    def value(word: int) -> float:  # the word above the largest finite bf16 is infinity: 2**128 here
        if word & 0x7FFF == 0x7F80:
            return math.copysign(2.0 ** 128, -1.0 if word & 0x8000 else 1.0)
        return float(np.array([word << 16], np.uint32).view(np.float32)[0])

    d_lo, d_hi = abs(x - value(lo)), abs(value(hi) - x)
    if d_lo != d_hi:
        return lo if d_lo < d_hi else hi
    return lo if lo % 2 == 0 else hi


def test_bf16_rounds_to_nearest_even_with_subnormals():
    cases = {
        0x3F808000: 0x3F80,  # 1 + half a bf16 ulp: a tie, the even word (down)
        0x3F818000: 0x3F82,  # a tie above an odd word: up to the even one
        0x3F807FFF: 0x3F80,  # just below the tie: down
        0x3F808001: 0x3F81,  # just above the tie: up
        0xBF818000: 0xBF82,  # negative: ties to even by magnitude
        0x00008000: 0x0000,  # the smallest subnormals: a tie at zero stays zero (even)
        0x00018000: 0x0002,  # a subnormal tie above an odd word goes up
        0x000116C2: 0x0001,  # 1e-40, a float32 subnormal: the nearest bf16 subnormal, 2**-133
        0x007FFFFF: 0x0080,  # the largest subnormal rounds up into the smallest normal
        0x7F7F7FFF: 0x7F7F,  # below the midpoint to infinity: the largest finite bf16
        0x7F7FFFFF: 0x7F80,  # float32 max is past that midpoint: +inf, as IEEE rounding says
    }
    bits = np.array(list(cases), np.uint32)
    words = f32_to_bf16(bits.view(np.float32))
    assert [hex(w) for w in words.tolist()] == [hex(w) for w in cases.values()]
    assert [hex(_bf16_reference(int(b))) for b in bits] == [hex(w) for w in cases.values()]
    back = bf16_to_f32(words)
    assert back[7] == 2.0 ** -133 and 0 < back[7] < np.finfo(np.float32).tiny  # a subnormal survives the trip
    assert back[8] == np.finfo(np.float32).tiny


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 0xFFFFFFFF))
def test_bf16_matches_reference_rounding(bits):
    x = np.array([bits], np.uint32).view(np.float32)
    if not np.isfinite(x[0]):
        return
    assert int(f32_to_bf16(x)[0]) == _bf16_reference(bits)


def test_bf16_words_round_trip_and_decode():
    x = np.array([0.0, -0.0, 1.0, -1.5, 3.0e38, 1e-40, np.inf, -np.inf, np.nan], dtype=np.float32)
    back = bf16_to_f32(f32_to_bf16(x))
    np.testing.assert_array_equal(back[:4], x[:4])  # exact in bf16
    assert np.signbit(back[1]) and not np.signbit(back[0])
    assert abs(back[4] - x[4]) <= x[4] / 256  # within half an ulp (8 significant bits)
    assert abs(back[5] - x[5]) <= 2.0 ** -134  # a subnormal: within half the smallest bf16 subnormal
    assert back[6] == np.inf and back[7] == -np.inf and np.isnan(back[8])
    np.testing.assert_array_equal(f32_to_bf16(back), f32_to_bf16(x))  # bf16 values are fixed points


def test_empty_and_scalar_tensors(tmp_path):
    path = tmp_path / "t.hxr"
    with TraceWriter(path) as w:
        w.begin_run()
        w.write("scalar", np.float32(2.5))
        w.write("empty_rows", np.zeros((0, 768), np.float16))
        w.write("empty_cols", np.zeros((4, 0), np.float32))
        w.write("empty_1d", np.zeros(0, np.int32))
        w.write("one_1d", np.arange(5, dtype=np.int64))
    with TraceReader(path) as r:
        assert r.read("scalar").shape == () and float(r.read("scalar")) == 2.5
        assert r.read("empty_rows").shape == (0, 768)
        assert r.read("empty_cols").shape == (4, 0)
        assert r.read("empty_1d").shape == (0,)
        assert int(r.read("one_1d", index=(-2,))) == 3
        assert len(r.info("empty_rows").chunks) == 0 and r.info("empty_rows").stored_bytes == 0
    assert verify(path).chunks == 2


def test_layout_is_aligned_and_compressed(tmp_path):
    path = tmp_path / "t.hxr"
    resid = np.random.default_rng(0).standard_normal((1024, 768)).astype(np.float16)
    with TraceWriter(path) as w:
        w.begin_run()
        w.write("blocks.0.hook_resid_post", resid)
        w.write("zeros", np.zeros((1024, 1024), np.float16))
    data = path.read_bytes()
    assert data[:8] == b"\x89HXR\r\n\x1a\n" and data[-8:] == b"HXR-END\n" and len(data) % 64 == 0
    with TraceReader(path) as r:
        info = r.info("blocks.0.hook_resid_post")
        assert info.chunk_rows == 682 and len(info.chunks) == 2  # whole rows, at most 1 MiB each
        assert all(int(off) % 64 == 0 for off in info.chunks[:, 0])
        assert info.stored_bytes < info.nbytes
        assert r.info("zeros").stored_bytes < 1000
        assert r.version == (1, 0) and r.features == [] and r.minor == 0


def test_uncompressed_chunks_are_raw_and_aligned(tmp_path):
    path = tmp_path / "t.hxr"
    x = np.arange(4096, dtype=np.float32).reshape(64, 64)
    with TraceWriter(path, level=None) as w:
        w.begin_run()
        w.write("x", x)
    data = path.read_bytes()
    with TraceReader(path) as r:
        off, plen, raw_len, _crc = (int(v) for v in r.info("x").chunks[0])
    assert plen == raw_len == x.nbytes
    start = off + 64
    assert start % 64 == 0 and data[start:start + plen] == x.tobytes()  # usable in place from an mmap


def test_writer_api_misuse(tmp_path):
    path = tmp_path / "t.hxr"
    with pytest.raises(ValueError):
        TraceWriter(path, chunk_bytes=0)
    with pytest.raises(TypeError):
        TraceWriter(path, meta={"x": {1, 2}})
    assert list(tmp_path.iterdir()) == []  # refused before any file was made
    with TraceWriter(path) as w:
        with pytest.raises(ValueError, match="outside a run"):
            w.write("x", np.zeros(2))
        w.begin_run(prompt="a")
        with pytest.raises(ValueError, match="unknown run"):
            w.write("x", np.zeros(2), run=7)
        w.write("x", np.zeros(2))
        w.flush()
        assert w.bytes_written > 64
        w.begin_run(prompt="b")  # ends the first run
    with pytest.raises(ValueError, match="closed"):
        w.write("y", np.zeros(2))
    with TraceReader(path) as r:
        assert [run["prompt"] for run in r.runs] == ["a", "b"]
        assert [run["status"] for run in r.runs] == ["complete", "complete"]
        assert "closed" in r.meta and "created" in r.meta
    with pytest.raises(TraceFormatError, match="no such file"):
        TraceWriter(tmp_path / "missing.hxr", append=True)


def test_append_is_locked_against_a_second_writer(tmp_path):
    path = tmp_path / "t.hxr"
    with TraceWriter(path) as w:
        w.begin_run()
    before = path.read_bytes()
    with TraceWriter(path, append=True) as w:
        with pytest.raises(TraceFormatError, match="another writer"):
            TraceWriter(path, append=True)
        w.begin_run(prompt="second")
    assert path.read_bytes()[:len(before)] == before
    with TraceReader(path) as r:
        assert len(r.runs) == 2


def test_float32_mode_upcasts_exactly(tmp_path):
    path = tmp_path / "t.hxr"
    x16 = np.array([65504, -65504, 6e-8, 0.1], dtype=np.float16)
    x64 = np.array([1 / 3, 1e300], dtype=np.float64)
    with TraceWriter(path) as w:
        w.begin_run()
        w.write("h", x16)
        w.write("d", x64)
        w.write("i", np.array([1, 2], np.int16))
    with TraceReader(path) as r:
        assert r.read("h").dtype == np.float32 and np.array_equal(r.read("h"), x16.astype(np.float32))
        assert r.read("d", dtype="stored").dtype == np.float64 and r.read("d", dtype="stored")[0] == 1 / 3
        assert r.read("d").dtype == np.float32  # float32 mode narrows f64 (documented)
        assert r.read("i").dtype == np.int16  # integers are returned as stored
        out = r.read("h")
        out[0] = 1  # results are writeable copies


def test_large_tensor_many_chunks(tmp_path):
    path = tmp_path / "t.hxr"
    x = np.random.default_rng(2).standard_normal((3000, 700)).astype(np.float32)  # 8.4 MB, 9 chunks
    with TraceWriter(path, threads=2, max_inflight=2) as w:
        w.begin_run()
        w.write("x", x)
    with TraceReader(path) as r:
        info = r.info("x")
        assert len(info.chunks) == math.ceil(3000 / info.chunk_rows)
        np.testing.assert_array_equal(r.read("x"), x)
        np.testing.assert_array_equal(r.read("x", index=slice(370, 2999)), x[370:2999])


def test_close_waits_for_chunks_still_compressing(tmp_path, monkeypatch):
    """Regression: close() used to stop draining at the first chunk not yet compressed, dropping the rest."""
    import time

    import trace_format.writer as writer_mod

    real = writer_mod.encode

    def slow_encode(*args, **kwargs):
        time.sleep(0.005)
        return real(*args, **kwargs)

    monkeypatch.setattr(writer_mod, "encode", slow_encode)
    path = tmp_path / "t.hxr"
    x = np.arange(40 * 16, dtype=np.float32).reshape(40, 16)
    with TraceWriter(path, chunk_bytes=64, threads=2, max_inflight=100) as w:
        w.begin_run()
        w.write("x", x)
    with TraceReader(path) as r:
        assert len(r.info("x").chunks) == 40
        np.testing.assert_array_equal(r.read("x"), x)


def _spec_reader(data: bytes) -> dict:
    """A minimal reader written from SPEC.md alone (struct, zlib, zstandard, msgpack): {(run, name): array}."""
    import struct
    import zlib

    import msgpack
    import zstandard

    def crc(b) -> int:
        return zlib.crc32(b) & 0xFFFFFFFF

    assert data[:8] == b"\x89HXR\r\n\x1a\n" and struct.unpack_from("<H", data, 8)[0] == 1
    assert struct.unpack_from("<I", data, 60)[0] == crc(data[:60])
    tr = data[-64:]
    assert tr[:8] == b"HXRTRAIL" and tr[56:] == b"HXR-END\n" and struct.unpack_from("<I", tr, 52)[0] == crc(tr[:52])
    index_offset, index_len, data_end, _prev, index_crc = struct.unpack_from("<QQQQI", tr, 16)
    assert data_end == len(data) - 64

    def record(off):
        h = data[off:off + 64]
        assert h[:4] == b"HXRr" and struct.unpack_from("<I", h, 60)[0] == crc(h[:60])
        kind, codec, filt, _flags, ident, chunk, plen, raw_len, first_row, pcrc = struct.unpack_from(
            "<BBBBIIQQQI", h, 4)
        payload = data[off + 64:off + 64 + plen]
        assert crc(payload) == pcrc
        if codec == 1:
            assert zstandard.get_frame_parameters(payload).content_size == raw_len
            payload = zstandard.ZstdDecompressor().decompress(payload)
        return kind, filt, ident, chunk, first_row, pcrc, payload

    kind, _, _, _, _, pcrc, raw = record(index_offset)
    assert kind == 0x83 and pcrc == index_crc
    index = msgpack.unpackb(raw, raw=False)
    assert index["hxr"][0] == 1 and index["features"] == []
    sizes = {"f32": 4, "f16": 2, "bf16": 2, "f64": 8, "i64": 8, "i32": 4, "i16": 2, "i8": 1, "u8": 1, "bool": 1}
    numpy_of = {"f32": "<f4", "f16": "<f2", "bf16": "<u2", "f64": "<f8", "i64": "<i8", "i32": "<i4", "i16": "<i2",
                "i8": "i1", "u8": "u1", "bool": "?"}
    out = {}
    for tid, t in enumerate(index["tensors"]):
        k = sizes[t["dtype"]]
        table = struct.iter_unpack("<QQQQ", t["chunks"])
        parts = []
        for c, (off, _plen, _raw_len, _crc) in enumerate(table):
            kind, filt, ident, chunk, first_row, _, payload = record(off)
            assert (kind, ident, chunk, first_row) == (0x82, tid, c, c * t["chunk_rows"])
            if filt == 1:  # unshuffle: byte i*k+j <- plane j, element i
                n = len(payload) // k
                payload = bytes(payload[j * n + i] for i in range(n) for j in range(k))
            parts.append(payload)
        out[(t["run"], t["name"])] = np.frombuffer(b"".join(parts), dtype=numpy_of[t["dtype"]]).reshape(t["shape"])
    return out


def test_spec_is_enough_to_write_a_reader(tmp_path):
    path = tmp_path / "t.hxr"
    rng = np.random.default_rng(3)
    with TraceWriter(path, chunk_bytes=100) as w:
        w.begin_run(prompt="a")
        w.write("h", rng.standard_normal((5, 7)).astype(np.float16))
        w.write("b", f32_to_bf16(rng.standard_normal((3, 2)).astype(np.float32)), dtype="bf16")
        w.write("i", np.arange(10, dtype=np.int64))
        w.write("s", np.float64(2.5))
        w.write("e", np.zeros((0, 3), np.float32))
    with TraceWriter(path, append=True) as w:
        w.begin_run(prompt="b")
        w.write("h", rng.standard_normal((2, 40)).astype(np.float32))
    mine = _spec_reader(path.read_bytes())
    with TraceReader(path) as r:
        assert set(mine) == {(t.run, t.name) for t in r.tensors()}
        for (run, name), x in mine.items():
            assert _same_bits(x, r.read(name, run, dtype="stored")), name
