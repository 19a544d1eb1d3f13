"""Hostile dataset folders and prompts files (issue 23, part 2): one line, a non-zero exit, bounded
memory and time, nothing outside the folder read or written, nothing lost.

Every command runs in a fresh interpreter under a timeout and an address-space cap (hostile_support.
bounded); the folder is a real `hexray record --prompts-file` of the embedded demo model, copied and
tampered with one thing per test.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
from hostile_support import bounded, hexray, one_line

from hexray_core.errors import HexRayError

PROMPTS = [{"prompt": "The capital of France is", "id": "a", "source": "x"},
           {"prompt": "Once upon a time there", "id": "b"},
           {"prompt": "She opened the door and", "id": "c", "target": " the"}]
AS_MB = 3000  # no numpy-only command needs more address space; /dev/zero would need it all


def _jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile-ds")
    out = tmp / "out"
    res = hexray("record", "--model", "hexray-demo", "--prompts-file", _jsonl(tmp / "p.jsonl", PROMPTS), "-o",
                 f"{out}/", "--shard-size", "2", "-q", timeout=300)
    assert res.returncode == 0, res.stderr
    return out


@pytest.fixture
def ds(recorded, tmp_path):
    """A fresh copy of the recorded folder, and a folder outside it."""
    out = tmp_path / "ds"
    shutil.copytree(recorded, out, symlinks=True)
    (tmp_path / "outside").mkdir()
    return out, tmp_path / "outside"


def _shards(out):
    return sorted(n for n in os.listdir(out / "shards") if n.endswith(".hxr"))


def _manifest(out) -> list[dict]:
    return [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]


def _aggregate(out, **kw):
    return bounded("aggregate", out, "--jobs", "1", as_limit_mb=AS_MB, **kw)


# -- links out of the folder --------------------------------------------------------------------------

def test_a_linked_shards_folder_is_neither_cleaned_nor_written(ds, tmp_path):
    out, outside = ds
    (outside / "keep.tmp").write_text("precious")
    (outside / "shard-000000001-0123456789ab.json").write_text("{}")  # an "orphan" sidecar to delete
    shutil.rmtree(out / "shards")
    os.symlink(outside, out / "shards")
    new = _jsonl(tmp_path / "more.jsonl", [*PROMPTS, {"prompt": "A new one", "id": "d"}])
    _, rc, _, err = bounded("record", "--model", "hexray-demo", "--prompts-file", new, "-o", f"{out}/", "-q",
                            timeout=300)
    one_line(rc, err, "shards: is a symbolic link")
    assert sorted(os.listdir(outside)) == ["keep.tmp", "shard-000000001-0123456789ab.json"]
    assert (outside / "keep.tmp").read_text() == "precious"
    _, rc, _, err = _aggregate(out)
    one_line(rc, err, "symbolic link")


def test_a_linked_lock_creates_nothing(ds, tmp_path):
    out, outside = ds
    (out / ".lock").unlink(missing_ok=True)
    os.symlink(outside / "created-by-hexray", out / ".lock")
    _, rc, _, err = bounded("record", "--model", "hexray-demo", "--prompts-file", _jsonl(tmp_path / "p.jsonl", PROMPTS),
                            "-o", f"{out}/", "-q", timeout=300)
    one_line(rc, err, ".lock: is a symbolic link")
    assert os.listdir(outside) == []


@pytest.mark.parametrize("which", ["dataset.json", "manifest.jsonl", "shard"])
def test_files_linking_out_of_the_folder_are_not_read(ds, which):
    out, outside = ds
    rel = f"shards/{_shards(out)[0]}" if which == "shard" else which
    shutil.move(out / rel, outside / "moved")  # the same, valid content, now outside
    os.symlink(outside / "moved", out / rel)
    _, rc, _, err = _aggregate(out)
    one_line(rc, err, "is a symbolic link")
    with pytest.raises(HexRayError, match="symbolic link"):
        from hexray_core.dataset.reader import open_dataset

        list(open_dataset(out))


# -- a tampered manifest or dataset.json ---------------------------------------------------------------

def _tamper_manifest(out, **change):
    entries = _manifest(out)
    entries[0].update(change)
    (out / "manifest.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))


@pytest.mark.parametrize("change, needle", [
    ({"shard": "shards/\u0000x.hxr"}, '"shard" is not'),
    ({"shard": "../../etc/passwd"}, '"shard" is not'),
    ({"run": float("inf")}, '"run" is not'),
    ({"run": 1e300}, '"run" is not'),
    ({"run": True}, '"run" is not'),
    ({"id": [1]}, '"id" is not'),
    ({"meta": "x"}, '"meta" is not'),
])
def test_tampered_manifest_fields_are_one_line(ds, change, needle):
    out, _ = ds
    _tamper_manifest(out, **change)
    _, rc, _, err = _aggregate(out)
    one_line(rc, err, "manifest.jsonl:1: not a manifest entry", needle)


@pytest.mark.parametrize("line, needle", [
    ('{"run": 1e400}', "not a manifest entry"),
    ("[" * 100_000, "nested too deeply"),
    (b'{"id": "\xff"}', "not UTF-8"),
    ("{nope", "not JSON"),
])
def test_tampered_manifest_lines_are_one_line(ds, line, needle):
    out, _ = ds
    raw = line if isinstance(line, bytes) else line.encode()
    (out / "manifest.jsonl").write_bytes(raw + b"\n" + (out / "manifest.jsonl").read_bytes())
    _, rc, _, err = _aggregate(out)
    one_line(rc, err, "manifest.jsonl:1", needle)


def test_an_out_of_range_target_is_one_line(ds):
    out, _ = ds
    _tamper_manifest(out, target="#99999999999999999999")
    _, rc, _, err = _aggregate(out)
    one_line(rc, err, "outside the vocabulary")


def test_an_out_of_range_target_in_replay(ds):
    out, _ = ds
    _, rc, _, err = bounded("replay", out / "shards" / _shards(out)[0], "--target", "#99999999999999999999",
                            as_limit_mb=AS_MB)
    one_line(rc, err, "outside the vocabulary")


def test_an_entry_without_id_through_the_api(ds):
    from hexray_core.dataset.reader import open_dataset

    out, _ = ds
    entries = _manifest(out)
    del entries[1]["id"]
    (out / "manifest.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
    with pytest.raises(HexRayError, match='manifest.jsonl:2: not a manifest entry \\("id" is not'):
        list(open_dataset(out))


@pytest.mark.parametrize("content, needle", [
    ("[" * 100_000, "nested too deeply"),
    ('{"hexray": {}, "last": [1]}', '"last" is not an object'),
    ('{"hexray": {}, "last": {"prompts": "x"}}', '"last.prompts" is not an integer'),
    ("[]", "not a HexRay dataset"),
])
def test_tampered_dataset_json_is_one_line(ds, content, needle):
    out, _ = ds
    (out / "dataset.json").write_text(content)
    _, rc, _, err = _aggregate(out)
    one_line(rc, err, "dataset.json", needle)


def test_a_fifo_or_dev_zero_as_dataset_json(ds):
    out, _ = ds
    (out / "dataset.json").unlink()
    os.mkfifo(out / "dataset.json")  # nobody writes it: opening it for reading would block forever
    _, rc, _, err = _aggregate(out, timeout=60)
    one_line(rc, err, "a FIFO")
    (out / "dataset.json").unlink()
    os.symlink("/dev/zero", out / "dataset.json")
    mb, rc, _, err = _aggregate(out, timeout=60)
    one_line(rc, err, "symbolic link")
    assert mb < 200, mb


def test_200k_manifest_lines_naming_one_run_are_refused_fast(ds):
    out, _ = ds
    first = (out / "manifest.jsonl").read_text().splitlines()[0]
    entry = json.loads(first)
    lines = [first] + [json.dumps({**entry, "id": f"dup{i}"}) for i in range(200_000)]
    (out / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    mb, rc, _, err = _aggregate(out, timeout=60)  # (300 s were not enough before)
    one_line(rc, err, "manifest.jsonl:2: run 0 of shards/", "is listed twice")
    assert mb < 200, mb


# -- recording from a hostile prompts file -------------------------------------------------------------

@pytest.mark.parametrize("row, needle", [
    ('{"prompt": "hi", "id": "\\ud800"}', "lone surrogate"),
    ('{"prompt": "hi", "\\udc00": 1}', "lone surrogate"),
    ('{"prompt": "hi", "note": "a\\ud800b"}', "lone surrogate"),
    ('{"prompt": "hi", "target": "\\ud800"}', "lone surrogate"),
    ('{"prompt": "hi", "meta": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested too deeply"),
])
def test_unstorable_rows_are_refused_before_recording(tmp_path, row, needle):
    src = tmp_path / "p.jsonl"
    src.write_text('{"prompt": "fine"}\n' + row + "\n")
    out = tmp_path / "out"
    _, rc, _, err = bounded("record", "--model", "hexray-demo", "--prompts-file", src, "-o", f"{out}/", "-q",
                            timeout=300)
    one_line(rc, err, "p.jsonl:2", needle)
    assert not out.exists() or not [n for n in os.listdir(out / "shards") if n.endswith(".hxr")]


@pytest.mark.parametrize("option", ["--prompts-file", "--prompt-file"])
def test_dev_zero_as_the_prompts_file_is_bounded(tmp_path, option):
    mb, rc, _, err = bounded("record", "--model", "hexray-demo", option, "/dev/zero", "-o", f"{tmp_path}/o/", "-q",
                             timeout=120)
    one_line(rc, err, "/dev/zero: is a character device")
    assert mb < 400, mb


def test_help_says_a_fifo_waits(tmp_path):
    res = hexray("record", "--help")
    assert "named pipe is read as cat would" in " ".join(res.stdout.split())


@pytest.mark.slow
def test_an_id_recorded_with_another_prompt_is_said(ds, tmp_path):
    out, _ = ds
    before = {n: (out / "shards" / n).read_bytes() for n in _shards(out)}
    changed = [dict(PROMPTS[0], prompt="Something else entirely"), *PROMPTS[1:]]
    res = hexray("record", "--model", "hexray-demo", "--prompts-file", _jsonl(tmp_path / "c.jsonl", changed), "-o",
                 f"{out}/", "-q", timeout=300)
    assert res.returncode == 0, res.stderr
    assert ('hexray: warning: 1 id(s) already recorded with a different prompt are skipped, the earlier recording '
            'kept (first: id "a", line 1)') in res.stderr
    assert {n: (out / "shards" / n).read_bytes() for n in _shards(out)} == before  # nothing lost or replaced
