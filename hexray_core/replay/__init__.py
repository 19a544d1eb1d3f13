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

from .attention import attention_summary
from .attribution import Attribution, Component, Contribution, direct_logit_attribution, next_token_attributions
from .cache import Slice, get_act_name
from .cot import cot_breakdown, split_steps
from .diff import attribution_diff
from .lens import logit_lens
from .residual import residual_trace
from .trace import MissingHook, Run, Trace, open_trace

__all__ = [
    "Attribution", "Component", "Contribution", "MissingHook", "Run", "Slice", "Trace", "attention_summary",
    "attribution_diff", "cot_breakdown", "direct_logit_attribution", "get_act_name", "logit_lens",
    "next_token_attributions", "open_trace", "residual_trace", "split_steps",
]
