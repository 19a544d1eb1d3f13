"""Tiny offline test models: a GPT-2 and a Llama-architecture causal LM built in memory.

Nothing here touches the network. Each builder returns a fresh Hugging Face model (eval mode,
float32) and a byte-level BPE tokenizer trained in memory on a small corpus that includes
emoji and CJK text, so tokens that split a multi-byte UTF-8 character really occur.

Weights are random, but every LayerNorm/RMSNorm weight and every bias is perturbed away from
its init value (1 / 0), so tests of weight folding and of the attribution identity cannot pass
by accident.

    tok = build_tokenizer()                           # ~10 ms, deterministic
    hf = build_tiny_gpt2(tok)                         # GPT2LMHeadModel, 2 layers, d_model 64
    hf = build_tiny_llama(tok)                        # LlamaForCausalLM, 2 layers, GQA 4/2, RMSNorm, rotary
    hf = build_tiny_mistral(tok) / build_tiny_gemma2(tok) / build_tiny_bloom(tok)   # sliding window, soft-cap, ALiBi
    save_tiny_model(hf, tok, "/tmp/dir")              # a save_pretrained folder HexRay can load by path

The TransformerLens bridge wraps (and, in compatibility mode, mutates) the HF model it is given:
build a new model for each bridge, and compute any reference HF logits before booting one.
Importing this module imports torch and transformers (a few seconds): do it from a
session-scoped fixture (see conftest.py).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

BOS = "<|endoftext|>"
TOKENIZER_NAME = "hexray-tiny-bpe"

#: Training text for the tokenizer: English, code-ish text, emoji (incl. ZWJ sequences and
#: skin tones), CJK, accented Latin. Small and repeated so merges form within words.
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Alice and Bob went to the store. Bob gave a drink to Alice.",
    "Let's think step by step. 2 + 3 = 5, so the answer is 5.",
    "Step 1: read the question. Step 2: write the answer.",
    "def add(a, b):\n    return a + b\n",
    "I love pizza 🍕 and cats 🐱! Family: 👨‍👩‍👧 Thumbs up 👍🏽",
    "東京は日本の首都です。北京是中国的首都。",
    "私は猫が好きです。我喜欢猫。",
    "Café, naïve, résumé, Zürich, São Paulo.",
]

#: Prompts with known tricky spans, for span tests.
PROMPTS = {
    "ascii": "The quick brown fox jumps over the lazy dog.",
    "emoji": "I love pizza 🍕 and cats 🐱!",
    "cjk": "東京は日本の首都です。",
    "mixed": "Café 👨‍👩‍👧 北京 ok",
}


def build_tokenizer(vocab_size: int = 320, name: str = TOKENIZER_NAME):
    """A byte-level BPE tokenizer (GPT-2 pre-tokenizer and byte alphabet) trained in memory.

    ``vocab_size`` is kept small (256 bytes + ~64 merges) so that many multi-byte characters
    are NOT single tokens and get split across byte tokens. It carries ``name_or_path`` and
    ``add_bos_token=True``, which TransformerLens 4.3 needs for an in-memory tokenizer.
    """
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2TokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS * 20, vocab_size=vocab_size, min_frequency=2, special_tokens=[BOS],
                            show_progress=False)
    return GPT2TokenizerFast(
        tokenizer_object=bpe._tokenizer,
        bos_token=BOS,
        eos_token=BOS,
        unk_token=BOS,
        add_bos_token=True,
        name_or_path=name,
    )


def _perturb_norms_and_biases(model, seed: int) -> None:
    """Move every norm weight off 1 and every bias off 0, deterministically."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            is_norm = any(k in name for k in ("ln_", "norm", "layernorm"))
            if is_norm and leaf == "weight":
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=gen))
            elif leaf == "bias":
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))


def build_tiny_gpt2(tok=None, *, n_layer: int = 2, d_model: int = 64, n_head: int = 4, n_ctx: int = 64,
                    seed: int = 0):
    """A random GPT2LMHeadModel (learned positions, LayerNorm, GELU, tied embeddings)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = tok or build_tokenizer()
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=n_layer, n_embd=d_model, n_head=n_head, n_positions=n_ctx, vocab_size=len(tok),
                     initializer_range=0.2, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = GPT2LMHeadModel(cfg).eval()
    _perturb_norms_and_biases(model, seed)
    return model


def build_tiny_llama(tok=None, *, n_layer: int = 2, d_model: int = 64, n_head: int = 4, n_kv_head: int = 2,
                     n_ctx: int = 64, seed: int = 0, biases: bool = True, rope: dict | None = None):
    """A random LlamaForCausalLM (rotary, RMSNorm, gated SiLU MLP, GQA, untied unembedding).

    Llama has no biases by default; ``attention_bias``/``mlp_bias`` are turned on (``biases=True``)
    so that bias folding is exercised too. GGUF has no place for them: use ``biases=False`` there.
    ``rope``: Hugging Face's ``rope_parameters`` (YaRN, dynamic, ...) instead of the default RoPE.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tok or build_tokenizer()
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=d_model, intermediate_size=2 * d_model,
                      num_hidden_layers=n_layer, num_attention_heads=n_head, num_key_value_heads=n_kv_head,
                      max_position_embeddings=n_ctx, initializer_range=0.2, attention_bias=biases, mlp_bias=biases,
                      tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=None, **({"rope_parameters": rope} if rope else {}))
    model = LlamaForCausalLM(cfg).eval()
    _perturb_norms_and_biases(model, seed)
    return model


def _tiny_config(cls, tok, *, n_layer, d_model, n_head, n_kv_head, n_ctx, **extra):
    return cls(vocab_size=len(tok), hidden_size=d_model, intermediate_size=2 * d_model, num_hidden_layers=n_layer,
               num_attention_heads=n_head, num_key_value_heads=n_kv_head, head_dim=d_model // n_head,
               max_position_embeddings=n_ctx, initializer_range=0.2, bos_token_id=tok.bos_token_id,
               eos_token_id=tok.eos_token_id, pad_token_id=None, **extra)


def build_tiny_mistral(tok=None, *, n_layer: int = 2, d_model: int = 64, n_head: int = 4, n_kv_head: int = 2,
                       n_ctx: int = 64, window: int = 4, seed: int = 0):
    """A random MistralForCausalLM: Llama-like, with a sliding attention window of ``window`` tokens."""
    from transformers import MistralConfig, MistralForCausalLM

    tok = tok or build_tokenizer()
    torch.manual_seed(seed)
    cfg = _tiny_config(MistralConfig, tok, n_layer=n_layer, d_model=d_model, n_head=n_head, n_kv_head=n_kv_head,
                       n_ctx=n_ctx, sliding_window=window)
    model = MistralForCausalLM(cfg).eval()
    _perturb_norms_and_biases(model, seed)
    return model


def build_tiny_gemma2(tok=None, *, n_layer: int = 2, d_model: int = 64, n_head: int = 4, n_kv_head: int = 2,
                      n_ctx: int = 64, window: int = 4, softcap: float = 5.0, seed: int = 0):
    """A random Gemma2ForCausalLM: attention logits soft-capped at ``softcap``, sliding-window and global
    layers alternating, a query scale from ``query_pre_attn_scalar`` (not 1/sqrt(d_head))."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    tok = tok or build_tokenizer()
    torch.manual_seed(seed)
    cfg = _tiny_config(Gemma2Config, tok, n_layer=n_layer, d_model=d_model, n_head=n_head, n_kv_head=n_kv_head,
                       n_ctx=n_ctx, sliding_window=window, attn_logit_softcapping=softcap, query_pre_attn_scalar=20)
    return Gemma2ForCausalLM(cfg).eval()


def build_tiny_bloom(tok=None, *, n_layer: int = 2, d_model: int = 64, n_head: int = 4, seed: int = 0):
    """A random BloomForCausalLM: ALiBi position biases (HexRay stores its attention patterns)."""
    from transformers import BloomConfig, BloomForCausalLM

    tok = tok or build_tokenizer()
    torch.manual_seed(seed)
    cfg = BloomConfig(vocab_size=len(tok), hidden_size=d_model, n_layer=n_layer, n_head=n_head,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    return BloomForCausalLM(cfg).eval()


def save_tiny_model(model, tok, path) -> str:
    """``save_pretrained`` the model and tokenizer into ``path`` (a folder HexRay loads with --model PATH)."""
    path = os.fspath(path)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def save_tiny_gguf(model, tok, path) -> str:
    """Write a bias-free tiny Llama and its byte-level BPE tokenizer as a float32 GGUF file (as llama.cpp's
    converter would: Q/K rows permuted, llama.* keys, tokenizer.ggml.* with model "gpt2"). Needs ``gguf``."""
    import json

    import gguf
    import numpy as np

    cfg = model.config
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = cfg.hidden_size // n_head

    def permute(w, heads):  # llama.cpp's convert_hf_to_gguf permutation of q/k rows (undone on load)
        return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    w = gguf.GGUFWriter(os.fspath(path), "llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(float(getattr(cfg, "rope_theta", None) or 10000.0))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(0)
    spec = json.loads(tok.backend_tokenizer.to_str())
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    tokens = tok.convert_ids_to_tokens(list(range(len(tok))))
    special = set(tok.all_special_ids)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if i in special else 1 for i in range(len(tokens))])
    w.add_token_merges(merges)
    w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        w.add_tensor(f"blk.{i}.attn_q.weight", permute(sd[p + "self_attn.q_proj.weight"], n_head))
        w.add_tensor(f"blk.{i}.attn_k.weight", permute(sd[p + "self_attn.k_proj.weight"], n_kv))
        w.add_tensor(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        w.add_tensor(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        w.add_tensor(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    del np
    return os.fspath(path)


def hf_logits(model, token_ids) -> torch.Tensor:
    """Reference logits ``[n, d_vocab]`` from the plain HF model (call before any bridge wraps it)."""
    with torch.no_grad():
        return model(torch.as_tensor([list(token_ids)])).logits[0].float()
