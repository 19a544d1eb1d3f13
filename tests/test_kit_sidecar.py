"""Large kit weights are decoded once and then mapped: the first read leaves ``<sha>.<name>.f32.npy`` beside the
cached kit, later readers map it (same values), and a sidecar that does not match the kit is ignored and rewritten.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from hexray_core.kit import reader as kit_reader
from hexray_core.replay import open_trace
from trace_format import WEIGHTS_RUN


@pytest.fixture
def trace_path(tiny_gpt2_recorder, fresh_cache, tmp_path, monkeypatch):
    monkeypatch.setattr(kit_reader, "MAP_MIN_BYTES", 1024)  # the tiny model's W_U is 80 KB: map it too
    return tiny_gpt2_recorder.record("The quick brown fox", tmp_path / "t.hxr").path


def _sidecar(trace, name):
    return os.path.join(os.path.dirname(trace.kit.reader.path), f"{trace.kit.sha256}.{name}.f32.npy")


def test_a_large_weight_is_decoded_once_then_mapped(trace_path):
    with open_trace(trace_path) as t:
        decoded = np.array(t.kit["W_U"])
        assert not isinstance(t.kit["W_U"], np.memmap)
        want = t.kit.reader.read("W_U", WEIGHTS_RUN)
        path = _sidecar(t, "W_U")
    assert os.path.isfile(path)
    with open_trace(trace_path) as t:
        mapped = t.kit["W_U"]
        assert isinstance(mapped, np.memmap) and not mapped.flags.writeable
        np.testing.assert_array_equal(mapped, want)
        np.testing.assert_array_equal(decoded, want)
        assert not os.path.exists(_sidecar(t, "b_U"))  # small weights stay in the kit only


@pytest.mark.parametrize("damage", ["shape", "dtype", "truncated", "link"])
def test_a_sidecar_that_does_not_match_is_ignored_and_rewritten(trace_path, tmp_path, damage):
    with open_trace(trace_path) as t:
        want = np.array(t.kit["W_U"])
        path = _sidecar(t, "W_U")
    os.unlink(path)
    if damage == "shape":
        np.save(path, np.zeros((3, 3), np.float32))
    elif damage == "dtype":
        np.save(path, want.astype(np.float64))
    elif damage == "truncated":
        np.save(path, want)
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    else:
        other = tmp_path / "elsewhere.npy"
        np.save(other, np.zeros_like(want))
        os.symlink(other, path)
    with open_trace(trace_path) as t:
        got = t.kit["W_U"]
        assert not isinstance(got, np.memmap)
        np.testing.assert_array_equal(got, want)
    assert not os.path.islink(path)
    np.testing.assert_array_equal(np.load(path), want)  # rewritten from the kit
