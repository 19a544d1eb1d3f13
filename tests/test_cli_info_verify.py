"""`hexray info` and `hexray verify`, run as a user runs them (`python -m hexray ...`) on real traces."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from trace_format import WEIGHTS_RUN, TraceReader, TraceWriter

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FULL_META = {
    "hexray": {"version": "0.1.0", "trace": "recording"},
    "model": {"name": "gpt2", "source": "hub", "revision": "607a30d783dfa663caf39e06633721c8d4cfcd7e",
              "class": "GPT2LMHeadModel", "architecture": "GPT2LMHeadModel", "dtype": "float32",
              "config": {"n_layers": 2, "d_model": 8, "n_heads": 2, "d_head": 4, "d_mlp": 32, "d_vocab": 50,
                         "n_ctx": 64, "act_fn": "gelu_new", "normalization_type": "LN",
                         "positional_embedding_type": "standard", "gated_mlp": False},
              "processing": {"compatibility_mode": True, "fold_ln": True, "center_unembed": False}},
    "tokenizer": {"name": "gpt2", "vocab_size": 50, "bos_token_id": 0, "sha256": "ab" * 32},
    "kit": {"sha256": "cd" * 32, "bundled": True, "vocab": [f"t{i}" for i in range(50)]},
    "hooks": {"set": "default", "requested": ["blocks.*.hook_resid_post"]},
    "storage": {"act_dtype": "f16", "codec": "zstd:1", "chunk_bytes": 1048576},
    "writer": {"hexray": "0.1.0", "python": "3.11.7", "torch": "2.13.0", "numpy": "2.4.6", "device": "cpu"},
}


def hexray(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, COLUMNS="120", PYTHONPATH=REPO)
    return subprocess.run([sys.executable, "-m", "hexray", *args], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=120)


@pytest.fixture(scope="module")
def traces(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    rng = np.random.default_rng(0)
    full = d / "full.hxr"
    with TraceWriter(full, meta=FULL_META) as w:
        w.begin_run(prompt="The capital of France is\nParis", tokens=[0, 5, 6, 7, 8, 9, 10], n_prompt_tokens=5)
        for layer in range(2):
            w.write(f"blocks.{layer}.hook_resid_post", rng.standard_normal((7, 8)).astype(np.float16))
        w.write("blocks.0.attn.hook_pattern", np.tril(rng.random((2, 7, 7))).astype(np.float16))
        w.end_run()
        w.begin_run(prompt="東京 🍕", tokens=[1, 2, 3])
        w.write("blocks.0.hook_resid_post", rng.standard_normal((3, 8)).astype(np.float16))
        w.write("kit/W_U", rng.standard_normal((8, 50)).astype(np.float32), run=WEIGHTS_RUN)
    bare = d / "bare.hxr"  # no metadata at all, a run with nothing but its id
    with TraceWriter(bare) as w:
        w.begin_run()
        w.write("x", np.zeros((2, 2), np.float32))
    appended = d / "appended.hxr"
    appended.write_bytes(full.read_bytes())
    with TraceWriter(appended, append=True) as w:
        w.begin_run(prompt="appended later", tokens=[4, 4])
        w.write("blocks.0.hook_resid_post", np.ones((2, 8), np.float16))
    odd = d / "odd.hxr"  # metadata of unexpected types must not break info
    with TraceWriter(odd, meta={"model": "gpt2", "writer": ["x"], "created": 5, "kit": {"sha256": None}}) as w:
        w.begin_run(prompt=None, tokens="abc", n_prompt_tokens="2")
    return {"full": full, "bare": bare, "appended": appended, "odd": odd, "dir": d}


def test_info_text(traces):
    res = hexray("info", str(traces["full"]))
    assert res.returncode == 0, res.stderr
    out = res.stdout
    for needle in (".hxr v1.0", "created", "gpt2 (hub, GPT2LMHeadModel, float32, rev 607a30d783df)", "n_layers 2",
                   "compatibility_mode", "tokenizer", "kit      cdcdcdcdcdcdcdcd (bundled), 50 token strings",
                   "f16", "zstd:1", "writer   hexray 0.1.0, python 3.11.7, torch 2.13.0",
                   "The capital of France is\\nParis", "東京 🍕", "complete", "7 (+2 gen)", "weights",
                   "2 runs, 5 tensors"):
        assert needle in out, (needle, out)
    assert "blocks.0.hook_resid_post" not in out  # tensors only with --tensors
    res = hexray("info", str(traces["full"]), "--tensors")
    assert res.returncode == 0 and "blocks.0.attn.hook_pattern" in res.stdout and "[2, 7, 7]" in res.stdout
    assert "kit/W_U" in res.stdout


def test_info_json_schema(traces):
    res = hexray("info", str(traces["full"]), "--json", "--tensors")
    assert res.returncode == 0, res.stderr
    s = json.loads(res.stdout)
    assert set(s) == {"schema", "path", "file_size", "format", "created", "closed", "kind", "model", "tokenizer",
                      "kit", "storage", "hooks", "interventions", "intervention_dicts", "forward", "writer",
                      "meta_keys", "runs", "weights", "totals"}
    assert s["schema"] == 1 and s["file_size"] == os.path.getsize(traces["full"])
    assert s["format"] == {"version": "1.0", "major": 1, "minor": 0, "features": [], "appends": 0,
                           "uuid": s["format"]["uuid"]} and len(s["format"]["uuid"]) == 32
    assert s["model"]["name"] == "gpt2" and s["model"]["config"]["d_model"] == 8
    assert "vocab" not in s["kit"] and s["kit"]["n_vocab"] == 50  # bulky metadata is counted, not dumped
    assert s["writer"]["torch"] == "2.13.0" and s["kind"] == "recording"
    run0 = s["runs"][0]
    assert set(run0) == {"id", "status", "prompt", "prompt_chars", "n_tokens", "n_prompt_tokens", "n_generated",
                         "tensors", "chunks", "raw_bytes", "stored_bytes", "ratio", "tensor_list"}
    assert run0["n_tokens"] == 7 and run0["n_prompt_tokens"] == 5 and run0["n_generated"] == 2
    assert run0["tensors"] == 3 and run0["raw_bytes"] == 2 * 7 * 8 * 2 + 2 * 7 * 7 * 2
    assert run0["stored_bytes"] > 0 and run0["ratio"] == pytest.approx(run0["raw_bytes"] / run0["stored_bytes"],
                                                                        abs=1e-3)
    assert run0["tensor_list"][0] == {"name": "blocks.0.hook_resid_post", "dtype": "f16", "shape": [7, 8],
                                      "chunks": 1, "raw_bytes": 112,
                                      "stored_bytes": run0["tensor_list"][0]["stored_bytes"]}
    assert s["weights"]["tensors"] == 1 and s["weights"]["tensor_list"][0]["name"] == "kit/W_U"
    t = s["totals"]
    with TraceReader(traces["full"]) as r:
        assert t["tensors"] == len(r.tensors()) == 5
        assert t["raw_bytes"] == sum(i.nbytes for i in r.tensors())
        assert t["stored_bytes"] == sum(i.stored_bytes for i in r.tensors())
    res = hexray("info", str(traces["full"]), "--json", "--run", "1")
    s1 = json.loads(res.stdout)
    assert [r["id"] for r in s1["runs"]] == [1] and s1["weights"] is None and "tensor_list" not in s1["runs"][0]


@pytest.mark.parametrize("which", ["bare", "odd", "appended"])
def test_info_works_with_any_or_no_metadata(traces, which):
    res = hexray("info", str(traces[which]))
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""
    res = hexray("info", str(traces[which]), "--json")
    assert res.returncode == 0, res.stderr
    s = json.loads(res.stdout)
    if which == "bare":
        assert s["model"] is None and s["writer"] is None and s["runs"][0]["prompt"] is None
        assert s["runs"][0]["n_tokens"] is None and s["totals"]["tensors"] == 1
    if which == "odd":
        assert s["model"] is None and s["writer"] is None and s["created"] is None
        assert s["runs"][0]["n_tokens"] is None and s["runs"][0]["n_generated"] is None
    if which == "appended":
        assert s["format"]["appends"] == 1 and len(s["runs"]) == 3 and s["runs"][2]["prompt"] == "appended later"
        assert "appended 1x" in hexray("info", str(traces[which])).stdout


def test_verify_ok(traces):
    for which in ("full", "bare", "appended"):
        res = hexray("verify", str(traces[which]))
        assert res.returncode == 0, res.stderr
        assert res.stdout.startswith(f"OK {traces[which]}: ") and res.stderr == ""
    res = hexray("verify", str(traces["appended"]))
    assert "2 INDEX" in res.stdout and "1 META" in res.stdout and "chunks" in res.stdout
    res = hexray("verify", "--json", str(traces["full"]), str(traces["appended"]))
    assert res.returncode == 0
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    assert [r["ok"] for r in rows] == [True, True] and rows[1]["appends"] == 1
    assert set(rows[0]) == {"path", "ok", "size", "records", "record_kinds", "chunks", "runs", "tensors", "raw_bytes",
                            "stored_bytes", "superseded_bytes", "appends"}
    assert rows[0]["chunks"] == 5 and rows[0]["records"] == 7


def _damage(src, dst, offset_from_chunk: int = 80) -> int:
    """Flip a byte inside the first chunk's payload; return that chunk record's offset."""
    with TraceReader(src) as r:
        off = int(r.info("blocks.0.hook_resid_post").chunks[0, 0])
    data = bytearray(src.read_bytes())
    data[off + offset_from_chunk] ^= 0xFF
    dst.write_bytes(bytes(data))
    return off


def test_verify_names_the_first_damaged_record(traces):
    d = traces["dir"]
    bad = d / "bad.hxr"
    off = _damage(traces["full"], bad)
    res = hexray("verify", str(bad))
    assert res.returncode == 1 and res.stdout == ""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert "DAMAGED" in lines[0] and "chunk 0 of 'blocks.0.hook_resid_post' (run 0)" in lines[0]
    assert f"(at byte {off})" in lines[0] and "checksum" in lines[0]
    # a damaged header is named by its offset too
    data = bytearray(traces["full"].read_bytes())
    data[off + 20] ^= 0x01  # payload_len
    hdr = d / "hdr.hxr"
    hdr.write_bytes(bytes(data))
    res = hexray("verify", str(hdr))
    assert res.returncode == 1 and f"(at byte {off})" in res.stderr and "header" in res.stderr
    # several files: each reported, exit 1 if any is damaged
    res = hexray("verify", str(traces["full"]), str(bad))
    assert res.returncode == 1 and res.stdout.startswith("OK ") and res.stderr.count("\n") == 1


@pytest.mark.parametrize("cmd", ["info", "verify"])
def test_errors_are_one_line(traces, cmd):
    d = traces["dir"]
    (d / "notes.txt").write_text("not a trace at all\n" * 20)
    truncated = d / "truncated.hxr"
    truncated.write_bytes(traces["full"].read_bytes()[:-100])
    cases = {
        str(d / "missing.hxr"): "no such file",
        str(d / "notes.txt"): "not an .hxr trace (bad magic)",
        str(truncated): "no trailer at end of file",
        str(d): "directory",
    }
    for path, expect in cases.items():
        res = hexray(cmd, path)
        assert res.returncode == 1, (path, res)
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and expect in lines[0] and "Traceback" not in res.stderr, (path, res.stderr)
        assert lines[0].startswith("hexray")


def test_info_and_verify_on_a_recorded_trace(tiny_gpt2_recorder, tmp_path):
    """A trace made by the real recorder (tiny GPT-2, in memory)."""
    path = tmp_path / "rec.hxr"
    tiny_gpt2_recorder.record(["The capital of France is", "2 + 2 ="], path)
    res = hexray("info", str(path), "--json")
    assert res.returncode == 0, res.stderr
    s = json.loads(res.stdout)
    assert len(s["runs"]) == 2 and s["runs"][0]["prompt"] == "The capital of France is"
    assert s["runs"][0]["n_tokens"] > 0 and s["runs"][0]["tensors"] > 10 and s["totals"]["ratio"] > 0
    assert s["writer"] is not None and "torch" in s["writer"] and s["model"] is not None
    assert hexray("info", str(path)).returncode == 0
    res = hexray("verify", str(path))
    assert res.returncode == 0 and res.stdout.startswith("OK"), res.stderr
