"""``--generate N``: continue a prompt before recording it.

Greedy when ``temperature`` is 0, else sampling from softmax(logits / temperature) with a seeded
generator (a seed is drawn and recorded when none is given, so every run can be reproduced on the
same device). Generation stops after N tokens, or after the end-of-sequence token (which is kept).
The recorder then runs ONE forward pass over prompt + continuation, so every token, generated or
not, is recorded the same way; ``run["n_prompt_tokens"]`` says where the continuation starts.

Generation uses a key/value cache: one forward over the prompt, then one single-token forward per new
token, through the Hugging Face model that the bridge wraps (its modules are the bridge's, so its
logits are the bridge's). TransformerLens 4.3's attention bridges look for the cache under
``past_key_values`` / ``layer_past``; transformers 5 passes it as ``cache``. Without the shim below
every cached step attends only to itself (logits off by ~5 on GPT-2), which is why HexRay used to run
one full forward per token. The test suite checks greedy continuations against Hugging Face's own
``generate`` on the untouched model.
"""

from __future__ import annotations

import contextlib
import inspect
import secrets
import time
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


def _cache_alias(module, args, kwargs):
    """Forward pre-hook: hand transformers 5's ``cache`` to the bridge under ``past_key_values``."""
    if kwargs.get("past_key_values") is None and kwargs.get("cache") is not None:
        kwargs = {**kwargs, "past_key_values": kwargs["cache"]}
        return args, kwargs
    return None


@contextlib.contextmanager
def _cached_attention(bridge):
    handles = [block.attn.register_forward_pre_hook(_cache_alias, with_kwargs=True) for block in bridge.blocks]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _step_fn(bridge):
    """``step(ids [1, m], cache) -> last logits [d_vocab]`` through the wrapped HF model, or None without one."""
    hf = getattr(bridge, "original_model", None)
    if hf is None:
        return None
    from transformers import DynamicCache

    params = inspect.signature(hf.forward).parameters
    key = "cache" if "cache" in params else "past_key_values"

    def step(ids: torch.Tensor, cache) -> torch.Tensor:
        out = hf(input_ids=ids, use_cache=True, **{key: cache})
        return out.logits[0, -1]

    return step, DynamicCache


def generate(bridge, tokens: list[int], n: int, *, device, temperature: float = 0.0, seed: int | None = None,
             eos_token_id: int | None = None, progress=None, window=None) -> Generated:
    """Continue ``tokens`` by up to ``n`` tokens.

    ``progress(done, total, tokens_per_s)`` is called after each new token. Sampling draws from a CPU
    generator, so a seed gives the same tokens on any device (up to the logits' own numerical
    differences). ``window(start)`` is called before each forward pass with the position of its first
    token (interventions at named positions need it: a cached step sees only the new token).
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
    stepper = _step_fn(bridge)
    new: list[int] = []
    t0 = time.perf_counter()
    with warnings.catch_warnings(), torch.no_grad(), _cached_attention(bridge):
        warnings.simplefilter("ignore")
        if stepper is not None:
            step, make_cache = stepper
            cache = make_cache()
            if window is not None:
                window(0)
            logits = step(torch.tensor([tokens], device=device), cache)
        else:  # a bridge without a wrapped HF model: a full forward per token
            seq = list(tokens)
            if window is not None:
                window(0)
            logits = bridge(torch.tensor([seq], device=device), return_type="logits")[0, -1]
        for i in range(int(n)):
            lg = logits.float().cpu()
            if sample:
                nxt = int(torch.multinomial(torch.softmax(lg / temperature, dim=-1), 1, generator=gen))
            else:
                nxt = int(lg.argmax())
            new.append(nxt)
            if progress is not None:
                progress(i + 1, int(n), (i + 1) / max(time.perf_counter() - t0, 1e-9))
            if (eos_token_id is not None and nxt == eos_token_id) or i + 1 == int(n):
                break
            if stepper is not None:
                if window is not None:
                    window(len(tokens) + i)
                logits = step(torch.tensor([[nxt]], device=device), cache)
            else:
                seq.append(nxt)
                logits = bridge(torch.tensor([seq], device=device), return_type="logits")[0, -1]
    return Generated(new, temperature, seed)


def generate_uncached(bridge, tokens: list[int], n: int, *, device) -> list[int]:
    """Greedy continuation with one full forward per token (the previous implementation; for benchmarks)."""
    seq, new = list(tokens), []
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        for _ in range(int(n)):
            nxt = int(bridge(torch.tensor([seq], device=device), return_type="logits")[0, -1].argmax())
            seq.append(nxt)
            new.append(nxt)
    return new
