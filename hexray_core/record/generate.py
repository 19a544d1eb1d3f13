"""``--generate N``: continue a prompt before recording it.

Greedy when ``temperature`` is 0, else sampling from softmax(logits / temperature) with a seeded
generator (a seed is drawn and recorded when none is given, so every run can be reproduced on the
same device). Generation stops after N tokens, or after the end-of-sequence token (which is kept).
The recorder then runs ONE forward pass over prompt + continuation, so every token, generated or
not, is recorded the same way; ``run["n_prompt_tokens"]`` says where the continuation starts.
"""

from __future__ import annotations

import secrets
import warnings
from dataclasses import dataclass

import torch


@dataclass
class Generated:
    tokens: list[int]  # the new tokens only
    temperature: float
    seed: int | None

    def info(self) -> dict:
        return {"n": len(self.tokens), "temperature": float(self.temperature), "seed": self.seed}


def no_generation() -> dict:
    return {"n": 0, "temperature": 0.0, "seed": None}


def generate(bridge, tokens: list[int], n: int, *, device, temperature: float = 0.0, seed: int | None = None,
             eos_token_id: int | None = None) -> Generated:
    """Continue ``tokens`` by up to ``n`` tokens.

    Each step is a full forward pass over the sequence so far, without a KV cache: TransformerLens
    4.3's ``bridge.generate`` with its KV cache continues differently from the bridge's own forward
    pass in compatibility mode (checked on GPT-2 and Llama), and the continuation must be the one
    the recorded forward pass predicts. Sampling draws from a CPU generator, so a seed gives the same
    tokens on any device (up to the logits' own numerical differences).
    """
    temperature = float(temperature or 0.0)
    if n <= 0:
        return Generated([], temperature, None)
    sample = temperature > 0
    if sample and seed is None:
        seed = secrets.randbits(31)
    if not sample:
        seed = None
    gen = torch.Generator().manual_seed(int(seed)) if sample else None
    seq = list(tokens)
    new: list[int] = []
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        for _ in range(int(n)):
            logits = bridge(torch.tensor([seq], device=device), return_type="logits")[0, -1].float().cpu()
            if sample:
                probs = torch.softmax(logits / temperature, dim=-1)
                nxt = int(torch.multinomial(probs, 1, generator=gen))
            else:
                nxt = int(logits.argmax())
            seq.append(nxt)
            new.append(nxt)
            if eos_token_id is not None and nxt == eos_token_id:
                break
    return Generated(new, temperature, seed)
