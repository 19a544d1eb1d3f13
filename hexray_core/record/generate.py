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
    """Continue ``tokens`` by up to ``n`` tokens with the bridge (KV cache on)."""
    if n <= 0:
        return Generated([], float(temperature or 0.0), None)
    temperature = float(temperature or 0.0)
    sample = temperature > 0
    if sample and seed is None:
        seed = secrets.randbits(31)
    if not sample:
        seed = None
    inp = torch.tensor([tokens], device=device)
    cuda_devices = [inp.device] if inp.device.type == "cuda" else []
    kwargs = dict(max_new_tokens=int(n), do_sample=sample, stop_at_eos=eos_token_id is not None,
                  eos_token_id=eos_token_id, return_type="tokens", verbose=False, use_past_kv_cache=True)
    if sample:
        kwargs["temperature"] = temperature
    with torch.random.fork_rng(devices=cuda_devices), warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if seed is not None:
            torch.manual_seed(seed)
        out = bridge.generate(inp, **kwargs)
    new = [int(t) for t in out[0, len(tokens):].tolist()]
    if eos_token_id is not None and eos_token_id in new:
        new = new[: new.index(eos_token_id) + 1]
    return Generated(new, temperature, seed)
