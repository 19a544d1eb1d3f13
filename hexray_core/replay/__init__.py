"""Replay: every analysis HexRay shows, computed from a recording with numpy only.

    open_trace(path) -> Trace          runs, tokens, tensors by hook name, model kit
    Trace[i] -> Run                    a TransformerLens ActivationCache of one prompt (cache.py methods)
    direct_logit_attribution(...)      a logit decomposed by component, head or neuron
    logit_lens(...)                    top tokens after every layer
    residual_trace(...)                residual and per-layer write norms per token
    attention_summary(...)             heads that attend most at a position, and to what
    cot_breakdown(...)                 chain-of-thought steps with per-step attribution
    attribution_diff(...)              two runs or two traces side by side

Nothing here may import torch or transformer_lens (a test checks it).
"""

# Loaded on first use (PEP 562): `hexray replay t.hxr` needs trace and attribution, not every view.
_EXPORTS = {
    "attention_summary": "attention", "Attribution": "attribution", "Component": "attribution",
    "Contribution": "attribution", "direct_logit_attribution": "attribution",
    "next_token_attributions": "attribution", "Slice": "cache", "get_act_name": "cache",
    "cot_breakdown": "cot", "split_steps": "cot", "attribution_diff": "diff", "logit_lens": "lens",
    "residual_trace": "residual", "MissingHook": "trace", "Run": "trace", "Trace": "trace", "open_trace": "trace",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
