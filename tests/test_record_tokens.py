"""Token strings and spans: exact for ASCII, emoji, CJK, and byte-level tokens that split a character."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hexray_core.record.tokens import NO_SPAN, encode_prompt, token_bytes, token_text


def check_spans(tok, prompt: str, ids: list[int], n_prompt: int | None = None, prepended: int | None = None):
    n_prompt = len(ids) if n_prompt is None else n_prompt
    if prepended is None:
        prepended = int(bool(ids) and ids[0] == tok.bos_token_id)
    tt = token_text(tok, ids, n_prompt, prompt, prepended=prepended)
    raw = tt.text.encode("utf-8")
    pieces = token_bytes(tok, ids)
    assert len(tt.char_spans) == len(tt.byte_spans) == len(tt.token_strs) == len(ids)
    pos = 0
    for i, (piece, (b0, b1), (c0, c1)) in enumerate(zip(pieces, tt.byte_spans, tt.char_spans, strict=True)):
        if piece is None and (b0, b1) == NO_SPAN:
            assert (c0, c1) == NO_SPAN and (i < prepended or i >= n_prompt or tok.decode([ids[i]]) not in prompt)
            continue
        if piece is None:  # a special token written out in the prompt
            piece = tok.convert_ids_to_tokens(ids[i]).encode()
        assert b0 == pos, f"token {i} does not start where the previous ended"
        pos = b1
        if i < n_prompt:
            assert raw[b0:b1] == piece  # exact bytes, even inside a character
        # the char span is the smallest run of whole characters covering the bytes
        assert len(tt.text[:c0].encode()) <= b0 and b1 <= len(tt.text[:c1].encode())
        if c1 > c0:
            assert len(tt.text[:c0 + 1].encode()) > b0 and len(tt.text[:c1 - 1].encode()) < b1
    assert pos == len(raw)
    return tt


@pytest.mark.parametrize("kind", ["ascii", "emoji", "cjk", "mixed"])
def test_spans_exact(tiny, tiny_tokenizer, kind):
    prompt = tiny.PROMPTS[kind]
    ids = encode_prompt(tiny_tokenizer, prompt, prepend_bos=True)
    tt = check_spans(tiny_tokenizer, prompt, ids)
    assert tt.text == prompt
    assert tt.char_spans[0] == [-1, -1] and tt.token_strs[0] == "<|endoftext|>"  # BOS


def test_ascii_spans_are_the_token_strings(tiny, tiny_tokenizer):
    prompt = tiny.PROMPTS["ascii"]
    ids = encode_prompt(tiny_tokenizer, prompt, prepend_bos=False)
    tt = token_text(tiny_tokenizer, ids, len(ids), prompt)
    assert [prompt[a:b] for a, b in tt.char_spans] == tt.token_strs
    assert tt.byte_spans == tt.char_spans


def test_emoji_split_across_tokens(tiny, tiny_tokenizer):
    """🍕 is 4 UTF-8 bytes; the tiny vocabulary splits it. Each piece gets exact bytes, the whole char span."""
    prompt = "pizza 🍕!"
    ids = encode_prompt(tiny_tokenizer, prompt, prepend_bos=False)
    tt = check_spans(tiny_tokenizer, prompt, ids)
    pizza = prompt.index("🍕")
    pizza_b = len(prompt[:pizza].encode())
    pieces = [(bs, cs) for bs, cs in zip(tt.byte_spans, tt.char_spans, strict=True)
              if cs[0] <= pizza < cs[1]]
    assert len(pieces) >= 2, "the tokenizer was expected to split the emoji"
    assert pieces[0][0][0] <= pizza_b and pieces[-1][0][1] >= pizza_b + 4
    assert any(pizza_b < bs[0] < pizza_b + 4 for bs, _ in pieces)  # a span starts inside the character
    assert any("\ufffd" in tt.token_strs[i] for i, cs in enumerate(tt.char_spans) if cs[0] <= pizza < cs[1])


def test_cjk_char_spans_cover_whole_characters(tiny, tiny_tokenizer):
    prompt = tiny.PROMPTS["cjk"]
    ids = encode_prompt(tiny_tokenizer, prompt, prepend_bos=False)
    tt = check_spans(tiny_tokenizer, prompt, ids)
    covered = set()
    for c0, c1 in tt.char_spans:
        covered.update(range(c0, c1))
    assert covered == set(range(len(prompt)))


def test_generated_continuation_split_inside_a_character(tiny_tokenizer):
    """A continuation that stops in the middle of a character ends in U+FFFD; spans stay consistent."""
    prompt = "cats!"
    prompt_ids = encode_prompt(tiny_tokenizer, prompt, prepend_bos=True)
    gen = encode_prompt(tiny_tokenizer, " 🐱", prepend_bos=False)
    assert len(gen) >= 2, "the tokenizer was expected to split the emoji"
    n_prompt = len(prompt_ids)
    all_ids = prompt_ids + gen
    cut = all_ids[:-1]  # the continuation stops before the emoji's last byte
    tt = token_text(tiny_tokenizer, cut, n_prompt, prompt, prepended=1)
    assert tt.text.startswith(prompt + " ") and tt.text.endswith("\ufffd")
    raw = tt.text.encode()
    for b0, b1 in tt.byte_spans[1:]:
        assert 0 <= b0 <= b1 <= len(raw)
    assert tt.byte_spans[-1][1] == len(raw)
    assert tt.char_spans[-1][1] == len(tt.text)
    full = prompt + " 🐱"
    whole = token_text(tiny_tokenizer, all_ids, n_prompt, prompt)
    assert whole.text == full
    check_spans(tiny_tokenizer, full, all_ids)


def test_special_token_written_in_the_prompt(tiny_tokenizer):
    """A special token spelled out in the text gets that text's span; the prepended BOS gets none."""
    prompt = "a<|endoftext|>b"
    ids = encode_prompt(tiny_tokenizer, prompt, prepend_bos=True)
    assert ids.count(tiny_tokenizer.bos_token_id) == 2
    tt = check_spans(tiny_tokenizer, prompt, ids)
    assert tt.char_spans == [[-1, -1], [0, 1], [1, 14], [14, 15]]


ALPHABET = "ab xyz.,!\n\t日本語東京🍕🐱👍🏽é\u200d"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(alphabet=ALPHABET, min_size=1, max_size=30))
def test_spans_property(tiny_tokenizer, text):
    ids = encode_prompt(tiny_tokenizer, text, prepend_bos=True)
    tt = check_spans(tiny_tokenizer, text, ids)
    assert tt.text == text


def test_every_token_id_a_trace_mentions_has_its_text_without_the_kit(tiny_gpt2_recorder, tiny_tokenizer, tmp_path,
                                                                       monkeypatch):
    """Top-k and logit-lens ids get their text from the trace itself (no kit, no '#id' placeholder); a token
    holding part of a UTF-8 character shows its bytes, so two such tokens never print alike."""
    from hexray_core.replay import open_trace

    res = tiny_gpt2_recorder.record("I love pizza 🍕 and cats 🐱! 東京", tmp_path / "t.hxr", lens=True, top_k=40)
    monkeypatch.setenv("HEXRAY_CACHE", str(tmp_path / "empty-cache"))  # the kit is out of reach
    with open_trace(res.path) as t:
        assert t.kit is None
        mentioned = set(t.tensor("hexray.topk_ids").reshape(-1).tolist())
        mentioned |= set(t.tensor("hexray.lens_topk_ids").reshape(-1).tolist()) | set(t.runs[0].tokens)
        pieces = dict(zip(sorted(mentioned), token_bytes(tiny_tokenizer, sorted(mentioned)), strict=True))
        partial = set()
        for tid in mentioned:
            text, raw = t.token_str(tid), pieces[tid]
            assert text != f"#{tid}" and "\ufffd" not in text, (tid, text)
            if "\ufffd" in tiny_tokenizer.decode([tid]) and raw is not None and raw.decode("utf-8", "replace") != text:
                partial.add(tid)
                assert text == raw.decode("utf-8", "backslashreplace")  # e.g. '\xf0\x9f'
            else:
                assert text == tiny_tokenizer.decode([tid])
        assert len(partial) >= 2 and len({t.token_str(i) for i in partial}) == len(partial)
        lens = t.logit_lens(-1, top_k=40)
        assert all(s != f"#{i}" and "\ufffd" not in s for layer in lens.layers for i, s, _ in layer.top)
