"""Token strings and exact character / UTF-8 byte spans of each token in the text.

Byte-level BPE tokens can end in the middle of a multi-byte character (an emoji is often two or
three tokens), so spans are computed from each token's *bytes*, not from its decoded string:

    byte_spans[i]  [start, end) UTF-8 byte offsets into the text: exact, even inside a character
    char_spans[i]  [start, end) code-point offsets into the text; a token that covers only part of
                   a character gets the span of that whole character
    special tokens (BOS, EOS, ...) get [-1, -1] in both

Token bytes come from the tokenizer's own byte alphabet when it has one (GPT-2 style byte-level
BPE; SentencePiece ``▁`` and ``<0xNN>`` byte fallback); otherwise from decoding the token alone.
If the tokens' bytes do not spell the text (a normalizing tokenizer), spans fall back to the
tokenizer's character offsets.

No torch here: this module only needs a Hugging Face tokenizer.
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass

NO_SPAN = (-1, -1)
_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (the 'Ġ' for space alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


BYTE_DECODER: dict[str, int] = {c: b for b, c in _bytes_to_unicode().items()}


@dataclass
class TokenText:
    """What a run stores about its tokens and text."""

    text: str
    token_strs: list[str]
    char_spans: list[list[int]]
    byte_spans: list[list[int]]


def _decoder_kinds(tokenizer) -> set[str]:
    """Names of the decoder steps of a fast tokenizer's backend ('ByteLevel', 'ByteFallback', 'Metaspace'...)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    if decoder is None:
        return set()
    try:
        import json

        spec = json.loads(backend.to_str()).get("decoder") or {}
    except Exception:
        return {type(decoder).__name__}
    kinds = {spec.get("type", "")}
    for step in spec.get("decoders", []) or []:
        kinds.add(step.get("type", ""))
        if step.get("type") == "Replace" and (step.get("pattern") or {}).get("String") == "▁":
            kinds.add("Metaspace")
    return kinds


def special_ids(tokenizer) -> set[int]:
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for tid, added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(added, "special", False):
            ids.add(int(tid))
    return ids


def token_bytes(tokenizer, ids: list[int]) -> list[bytes | None]:
    """The bytes each token stands for; ``None`` for special tokens."""
    specials = special_ids(tokenizer)
    pieces = tokenizer.convert_ids_to_tokens(list(ids))
    kinds = _decoder_kinds(tokenizer)
    out: list[bytes | None] = []
    for tid, piece in zip(ids, pieces, strict=True):
        if tid in specials or piece is None:
            out.append(None)
            continue
        if "ByteLevel" in kinds and all(c in BYTE_DECODER for c in piece):
            out.append(bytes(BYTE_DECODER[c] for c in piece))
            continue
        if kinds & {"Metaspace", "ByteFallback"}:
            m = _BYTE_FALLBACK.match(piece)
            if m:
                out.append(bytes([int(m.group(1), 16)]))
            else:
                out.append(piece.replace("▁", " ").encode("utf-8"))
            continue
        out.append(tokenizer.decode([tid], clean_up_tokenization_spaces=False).encode("utf-8"))
    return out


def mentioned_token_texts(tokenizer, ids) -> tuple[list[str], list[list]]:
    """Decoded text of each id, and ``[id, bytes]`` for those that hold only part of a UTF-8 character
    (they decode to U+FFFD, so two different tokens would look alike; replay shows their bytes)."""
    ids = [int(i) for i in ids]
    strs = [tokenizer.decode([i], clean_up_tokenization_spaces=False) for i in ids]
    suspects = [i for i, text in zip(ids, strs, strict=True) if "\ufffd" in text]
    partial = []
    for tid, raw in zip(suspects, token_bytes(tokenizer, suspects) if suspects else [], strict=True):
        try:
            raw.decode("utf-8") if raw is not None else None
        except UnicodeDecodeError:
            partial.append([tid, raw])
    return strs, partial


def _decode_with_map(raw: bytes) -> tuple[str, list[int]]:
    """Decode UTF-8 (invalid bytes -> U+FFFD) and map each raw byte to the index of the char it became part of."""
    dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
    chars: list[str] = []
    owner = [0] * len(raw)
    pending_from = 0
    for i in range(len(raw)):
        got = dec.decode(raw[i:i + 1])
        if got:
            # Bytes pending_from..i produced len(got) chars. With 'replace' more than one char can
            # come out (an invalid prefix, then a valid char): give the last byte to the last char.
            for j in range(pending_from, i + 1):
                owner[j] = len(chars) + min(j - pending_from, len(got) - 1)
            chars.extend(got)
            pending_from = i + 1
    tail = dec.decode(b"", final=True)
    for j in range(pending_from, len(raw)):
        owner[j] = len(chars)
    chars.extend(tail)
    return "".join(chars), owner


def _char_byte_starts(text: str) -> list[int]:
    """UTF-8 byte offset of each character, plus the total length at the end."""
    starts, pos = [], 0
    for ch in text:
        starts.append(pos)
        pos += len(ch.encode("utf-8", errors="surrogatepass"))
    starts.append(pos)
    return starts


def _spans_from_pieces(pieces: list[bytes | None], raw: bytes, text: str, owner: list[int]):
    """Spans of each piece laid end to end over ``raw`` (the bytes ``text`` was decoded from)."""
    starts = _char_byte_starts(text)
    raw_valid = text.encode("utf-8", errors="surrogatepass") == raw
    char_spans, byte_spans = [], []
    pos = 0
    for piece in pieces:
        if piece is None:
            char_spans.append(list(NO_SPAN))
            byte_spans.append(list(NO_SPAN))
            continue
        a, b = pos, pos + len(piece)
        pos = b
        if a == b:
            c = owner[a] if a < len(owner) else len(text)
            char_spans.append([c, c])
            byte_spans.append([starts[c], starts[c]] if not raw_valid else [a, a])
            continue
        c0, c1 = owner[a], owner[b - 1] + 1
        char_spans.append([c0, c1])
        # Exact byte offsets when the text re-encodes to the raw bytes; else whole replaced chars.
        byte_spans.append([a, b] if raw_valid else [starts[c0], starts[c1]])
    return char_spans, byte_spans


def token_text(tokenizer, ids: list[int], n_prompt: int, prompt: str, *, prepended: int = 0) -> TokenText:
    """Text, token strings and spans for ``ids``, whose first ``n_prompt`` tokens encode ``prompt``.

    ``prepended``: how many leading tokens (a BOS the recorder added) are not part of the text.
    Special tokens written literally in the prompt (``<|endoftext|>``) get the span of that text.
    Tokens after ``n_prompt`` (a generated continuation) are decoded from their bytes and appended
    to the prompt; a continuation that stops inside a character ends in U+FFFD.
    """
    ids = [int(i) for i in ids]
    token_strs = [tokenizer.decode([i], clean_up_tokenization_spaces=False) for i in ids]
    pieces = token_bytes(tokenizer, ids)
    prompt_raw = prompt.encode("utf-8", errors="surrogatepass")
    prompt_pieces = _place_specials(tokenizer, ids[:n_prompt], pieces[:n_prompt], prompt_raw, prepended)
    gen_pieces = pieces[n_prompt:]
    joined = b"".join(p for p in prompt_pieces if p is not None)
    if joined != prompt_raw and joined.startswith(b" ") and joined[1:] == prompt_raw:
        # SentencePiece adds a prefix space ('▁Hello'): it belongs to no character of the text.
        first = next(i for i, p in enumerate(prompt_pieces) if p is not None)
        prompt_pieces[first] = prompt_pieces[first][1:]
        joined = joined[1:]
    gen_raw = b"".join(p for p in gen_pieces if p is not None)
    gen_text, gen_owner = _decode_with_map(gen_raw)
    if joined == prompt_raw:
        _, prompt_owner = _decode_with_map(prompt_raw)
        cs_p, bs_p = _spans_from_pieces(prompt_pieces, prompt_raw, prompt, prompt_owner)
    else:  # the tokens do not spell the prompt byte for byte (a normalizer): use the tokenizer's offsets
        cs_p, bs_p = _spans_from_offsets(tokenizer, prompt, ids[:n_prompt], prepended)
    # The prompt is valid UTF-8 but a continuation may not be: its spans are computed on its own.
    cs_g, bs_g = _spans_from_pieces(gen_pieces, gen_raw, gen_text, gen_owner)
    oc, ob = len(prompt), len(prompt_raw)
    cs_g = [s if s == list(NO_SPAN) else [s[0] + oc, s[1] + oc] for s in cs_g]
    bs_g = [s if s == list(NO_SPAN) else [s[0] + ob, s[1] + ob] for s in bs_g]
    return TokenText(prompt + gen_text, token_strs, cs_p + cs_g, bs_p + bs_g)


def _place_specials(tokenizer, ids, pieces, raw: bytes, prepended: int) -> list[bytes | None]:
    """Give a special token the bytes of its text when the prompt spells it out at that point."""
    out = list(pieces)
    pos = 0
    for i, (tid, piece) in enumerate(zip(ids, pieces, strict=True)):
        if piece is not None:
            pos += len(piece)
            continue
        if i < prepended:
            continue
        text = tokenizer.convert_ids_to_tokens(tid)
        if isinstance(text, str) and text and raw.startswith(text.encode("utf-8"), pos):
            out[i] = text.encode("utf-8")
            pos += len(out[i])
    return out


def _spans_from_offsets(tokenizer, prompt: str, ids: list[int], prepended: int):
    """Fallback: character offsets from the tokenizer, converted to bytes (whole characters only)."""
    starts = _char_byte_starts(prompt)
    none = [list(NO_SPAN) for _ in ids]
    try:
        enc = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
        offsets = [tuple(o) for o in enc["offset_mapping"]]
        enc_ids = [int(i) for i in enc["input_ids"]]
    except Exception:
        return none, [list(s) for s in none]
    if enc_ids != ids[prepended:]:
        return none, [list(s) for s in none]
    char_spans = [list(NO_SPAN)] * prepended + [[int(a), int(b)] for a, b in offsets]
    byte_spans = [list(NO_SPAN)] * prepended + [[starts[a], starts[b]] for a, b in offsets]
    return char_spans, byte_spans


def encode_prompt(tokenizer, prompt: str, prepend_bos: bool) -> list[int]:
    """Token ids of ``prompt``, with the BOS token first when ``prepend_bos`` and the tokenizer has one."""
    ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    bos = getattr(tokenizer, "bos_token_id", None)
    if prepend_bos and bos is not None:
        ids = [int(bos)] + ids
    return [int(i) for i in ids]


def vocab_strings(tokenizer, d_vocab: int) -> list[str]:
    """The display text of each token id ("" for ids past the tokenizer's vocabulary; the bytes, as
    '\\xe8\\x8b', for a token that holds part of a character)."""
    n = min(len(tokenizer), d_vocab)
    strs = [str(s) for s in tokenizer.batch_decode([[i] for i in range(n)], clean_up_tokenization_spaces=False)]
    # A token holding part of a UTF-8 character decodes to U+FFFD: show its bytes (as replay does everywhere).
    _, partial = mentioned_token_texts(tokenizer, [i for i, s in enumerate(strs) if "\ufffd" in s])
    for tid, raw in partial:
        strs[tid] = raw.decode("utf-8", errors="backslashreplace")
    return strs + [""] * (d_vocab - n)
