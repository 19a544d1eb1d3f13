"""Hostile input to `hexray fuzz` (issue 23, part 3): one line, a non-zero exit, bounded memory and
time, in a fresh interpreter under a timeout (hostile_support.bounded)."""

from __future__ import annotations

import pytest
from hostile_support import bounded, one_line

pytestmark = pytest.mark.slow  # every case starts an interpreter that imports torch and loads the model

PROMPT = "The capital of France is"


def _fuzz(tmp_path, *extra, **kw):
    return bounded("fuzz", "--model", "hexray-demo", "-q", "-o", f"{tmp_path}/fz/", *extra, timeout=300, **kw)


@pytest.mark.parametrize("content, needle", [
    ('{"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested too deeply"),
    ('{"prompt": "a\\ud800b"}', "lone surrogate"),
])
def test_bad_variants_files_are_one_line(tmp_path, content, needle):
    (tmp_path / "v.jsonl").write_text('{"prompt": "fine"}\n' + content + "\n")
    _, rc, _, err = _fuzz(tmp_path, "--prompt", PROMPT, "--variants", tmp_path / "v.jsonl")
    one_line(rc, err, "v.jsonl:2", needle)


def test_dev_zero_as_variants_is_bounded(tmp_path):
    mb, rc, _, err = _fuzz(tmp_path, "--prompt", PROMPT, "--variants", "/dev/zero")
    one_line(rc, err, "/dev/zero: is a character device")
    assert mb < 400, mb


def test_a_lone_surrogate_prompt_is_one_line(tmp_path):
    _, rc, _, err = _fuzz(tmp_path, "--prompt", "abc\udcff")  # what argv holds for the byte 0xff
    one_line(rc, err, "--prompt", "lone surrogate")


@pytest.mark.parametrize("where", ["--variants", "--prompt-file"])
def test_megabytes_of_text_are_judged_before_tokenizing_them_all(tmp_path, where):
    """A 10 MB variant peaked at 1.8 GB and a 5 MB prompt at 1.14 GB before the context-length error."""
    words = ("the cat sat on a mat " * 500_000)[:10_000_000]
    (tmp_path / "big.txt").write_text(words)
    args = ["--prompt", PROMPT, "--variants", tmp_path / "big.txt"] if where == "--variants" else \
        ["--prompt-file", tmp_path / "big.txt"]
    mb, rc, _, err = _fuzz(tmp_path, *args)
    one_line(rc, err, "over the model's context of")
    assert mb < 900, mb


def test_100k_variants_are_refused_unless_asked(tmp_path):
    (tmp_path / "v.txt").write_text("".join(f"variant number {i}\n" for i in range(100_000)))
    mb, rc, _, err = _fuzz(tmp_path, "--prompt", PROMPT, "--variants", tmp_path / "v.txt")
    one_line(rc, err, "--variants gives 100,000 variants, over --max-variants 2,000")
    _, rc, _, err = _fuzz(tmp_path, "--prompt", PROMPT, "--alternatives", "3", "--max-variants", "2")
    one_line(rc, err, "the prompt makes", "over --max-variants 2 ")


def test_an_out_of_range_target_is_one_line(tmp_path):
    _, rc, _, err = _fuzz(tmp_path, "--prompt", PROMPT, "--target", "#99999999999999999999")
    one_line(rc, err, "outside the vocabulary")
