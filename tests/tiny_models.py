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
                     n_ctx: int = 64, seed: int = 0):
    """A random LlamaForCausalLM (rotary, RMSNorm, gated SiLU MLP, GQA, untied unembedding).

    Llama has no biases by default; ``attention_bias``/``mlp_bias`` are turned on so that
    bias folding is exercised too.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tok or build_tokenizer()
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=d_model, intermediate_size=2 * d_model,
                      num_hidden_layers=n_layer, num_attention_heads=n_head, num_key_value_heads=n_kv_head,
                      max_position_embeddings=n_ctx, initializer_range=0.2, attention_bias=True, mlp_bias=True,
                      tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=None)
    model = LlamaForCausalLM(cfg).eval()
    _perturb_norms_and_biases(model, seed)
    return model


def save_tiny_model(model, tok, path) -> str:
    """``save_pretrained`` the model and tokenizer into ``path`` (a folder HexRay loads with --model PATH)."""
    path = os.fspath(path)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def hf_logits(model, token_ids) -> torch.Tensor:
    """Reference logits ``[n, d_vocab]`` from the plain HF model (call before any bridge wraps it)."""
    with torch.no_grad():
        return model(torch.as_tensor([list(token_ids)])).logits[0].float()
