"""Write the reference-oracle fixtures under tests/fixtures/reference/ (SAELens and circuit-tracer outputs).

Run with the reference venv (scripts/reference/make_venv.sh), never with HexRay's own venv:

    /work/refvenv/bin/python scripts/reference/make_fixtures.py [--out tests/fixtures/reference] [--only gpt2,llama]

SAELens 6.54 and circuit-tracer 0.5 cannot be installed beside HexRay's recorder (they pin TransformerLens < 4 and
transformers <= 4.57.3), so they run here, once, and what they compute is committed as small files that HexRay's
tests compare against. Everything is seeded: a rerun on the same package versions rewrites the same numbers.
The format of every file is in tests/fixtures/reference/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from importlib.metadata import version
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
BOS = "<|endoftext|>"
# The corpus of tests/tiny_models.py, so the tokenizer splits multi-byte characters the same way.
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
PROMPTS = {
    "gpt2": "Step 2: write the answer.",  # 12 tokens with BOS
    "llama": "Let's think step by step.",  # 13 tokens with BOS
}
D_SAE = 48  # SAELens dictionaries
D_TC = 48  # circuit-tracer transcoders, features per layer
ACTIVE_FRACTION = 0.25  # per feature, over the prompt's positions (bias chosen between two observed values)
NODE_THRESHOLD, EDGE_THRESHOLD = 0.8, 0.98


def savez(path, arrays: dict) -> None:
    """``np.savez_compressed`` with fixed zip timestamps, so a rerun rewrites byte-identical files (np.load reads
    it as any npz)."""
    import io
    import zipfile

    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for key, value in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asanyarray(value), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, buf.getvalue())


# ---------------------------------------------------------------- tokenizer and models


def build_tokenizer(folder: Path):
    """A byte-level BPE trained in memory, saved as tokenizer.json (+ a PreTrainedTokenizerFast config)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS * 20, vocab_size=320, min_frequency=2, special_tokens=[BOS], show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token=BOS, eos_token=BOS, unk_token=BOS,
                                  name_or_path=str(folder), model_max_length=64)
    return tok


def encode(tok, prompt: str) -> list[int]:
    """HexRay's rule (hexray_core/record/tokens.py encode_prompt): BOS, then the prompt without special tokens."""
    return [tok.bos_token_id] + list(tok(prompt, add_special_tokens=False)["input_ids"])


def _perturb_norms_and_biases(model, seed: int) -> None:
    """Every norm weight off 1 and every bias off 0 (as tests/tiny_models.py), so folding is exercised."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if any(k in name for k in ("ln_", "norm", "layernorm")) and leaf == "weight":
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=gen))
            elif leaf == "bias":
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))


def build_model(kind: str, tok):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if kind == "gpt2":
        # n_ctx: TransformerLens 3 reads it; d_mlp stays 4 * d_model, which its GPT-2 conversion assumes.
        cfg = GPT2Config(n_layer=3, n_embd=64, n_head=4, n_positions=64, n_ctx=64, vocab_size=len(tok),
                         initializer_range=0.2, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        model = GPT2LMHeadModel(cfg).eval()
    else:
        # No attention/MLP biases: TransformerLens 3's Llama conversion drops them, and the oracle must be exact.
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                          initializer_range=0.2, attention_bias=False, mlp_bias=False, tie_word_embeddings=False,
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=None)
        model = LlamaForCausalLM(cfg).eval()
    _perturb_norms_and_biases(model, seed=0)
    return model


def save_model(kind: str, out: Path):
    folder = out / kind
    if folder.exists():
        shutil.rmtree(folder)
    tok = build_tokenizer(folder)
    model = build_model(kind, tok)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    # Not needed to load the model, and it records the writer's transformers version: one file fewer to go stale.
    (folder / "generation_config.json").unlink(missing_ok=True)
    return folder, tok


def allow_local_folders() -> None:
    """TransformerLens 3.2.1's ``HookedTransformer.from_pretrained`` accepts a local folder everywhere except in one
    call, ``get_official_model_name``, which only knows hub names. Make that call the identity for an existing
    folder, so the rest of ``from_pretrained`` (config from config.json, weight conversion, fold_ln / centring /
    fold_value_biases processing) runs unchanged, exactly as SAELens and circuit-tracer call it."""
    from transformer_lens import loading_from_pretrained as loading

    if getattr(loading.get_official_model_name, "_hexray_local", False):
        return
    original = loading.get_official_model_name

    def official(name: str) -> str:
        return name if Path(name).is_dir() else original(name)

    official._hexray_local = True
    loading.get_official_model_name = official


_TL_COPIES: dict[str, str] = {}


def tl_path(folder: Path) -> str:
    """The folder to hand TransformerLens 3.2.1: ``folder`` itself, or an adapted copy when it trips one of
    TransformerLens 3 / transformers 4.57's limits, none of which changes a weight:
    - ``convert_hf_model_config`` takes any path containing "llama" for a hub Llama and then reads an unset
      ``hf_config`` (UnboundLocalError): the copy lives under a path without that word;
    - its GPT-2 conversion reads ``n_ctx``, which transformers 5 no longer writes: set to ``n_positions``;
    - transformers 4.57 cannot read a ``tokenizer_config.json`` written by transformers 5 (``TokenizersBackend``):
      the copy's says ``PreTrainedTokenizerFast`` over the same ``tokenizer.json``."""
    import tempfile

    folder = Path(folder)
    cfg = json.loads((folder / "config.json").read_text())
    tok_path = folder / "tokenizer_config.json"
    tok_cfg = json.loads(tok_path.read_text()) if tok_path.exists() else {}
    gpt2_no_ctx = cfg.get("model_type") == "gpt2" and "n_ctx" not in cfg
    new_tokenizer = tok_cfg.get("tokenizer_class") == "TokenizersBackend"
    if "llama" not in str(folder.resolve()).lower() and not gpt2_no_ctx and not new_tokenizer:
        return str(folder)
    if str(folder) not in _TL_COPIES:
        copy = Path(tempfile.mkdtemp(prefix="hexray_ref_")) / "model"
        shutil.copytree(folder, copy)
        if gpt2_no_ctx:
            cfg["n_ctx"] = cfg["n_positions"]
            (copy / "config.json").write_text(json.dumps(cfg, indent=1))
        if new_tokenizer:
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
            special = {k: tok.id_to_token(cfg[f"{k}_id"]) for k in ("bos_token", "eos_token")
                       if cfg.get(f"{k}_id") is not None}
            (copy / "tokenizer_config.json").write_text(json.dumps(
                {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False, **special}))
        _TL_COPIES[str(folder)] = str(copy)
    return _TL_COPIES[str(folder)]


def load_tl(folder: Path, **kwargs):
    """The model as SAELens loads it: sae_lens.load_model -> HookedTransformer.from_pretrained_no_processing."""
    from sae_lens.load_model import load_model

    allow_local_folders()
    return load_model("HookedTransformer", tl_path(folder), device="cpu", model_from_pretrained_kwargs=kwargs)


# ---------------------------------------------------------------- dictionaries


def _cut_between(values: np.ndarray, fraction: float) -> np.ndarray:
    """Per column, a value halfway between two neighbouring observed values such that about ``fraction`` of
    the rows lie above it. Of the neighbouring pairs near that rank, the widest gap is taken, so no observed value
    lies near the cut: a reimplementation that differs by float rounding still finds the same active set."""
    v = np.sort(values, axis=0)
    n = len(v)
    i = min(max(int(round((1 - fraction) * n)) - 1, 0), n - 2)
    spread = max(1, n // 20)
    js = np.arange(max(i - spread, 0), min(i + spread, n - 2) + 1)
    gaps = v[js + 1] - v[js]  # [candidates, columns]
    j = js[np.argmax(gaps, axis=0)]
    cols = np.arange(v.shape[1])
    return (v[j, cols] + v[j + 1, cols]) / 2


def margin(pre: np.ndarray, cut: np.ndarray | float) -> float:
    """The smallest distance of a pre-activation from its cut, relative to the largest pre-activation."""
    return float(np.abs(pre - cut).min() / max(np.abs(pre).max(), 1e-12))


def _rand(gen, *shape, scale=1.0):
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).float()


SAE_SPECS = {
    # (name, architecture, hook_in, hook_out or None, extra cfg, model_from_pretrained_kwargs or None = default)
    "gpt2": [
        ("standard_resid_pre1", "standard", "blocks.1.hook_resid_pre", None, {}, None),
        ("topk_resid_post2", "topk", "blocks.2.hook_resid_post", None, {"k": 8}, None),
        ("jumprelu_resid_mid1", "jumprelu", "blocks.1.hook_resid_mid", None, {}, None),
        ("gated_resid_post0", "gated", "blocks.0.hook_resid_post", None, {}, None),
        ("standard_bdec_resid_pre2", "standard", "blocks.2.hook_resid_pre", None, {"apply_b_dec_to_input": True},
         None),
        ("standard_norm_resid_post1", "standard", "blocks.1.hook_resid_post", None,
         {"normalize_activations": "expected_average_only_in"}, None),
        ("standard_centred_resid_post1", "standard", "blocks.1.hook_resid_post", None, {},
         {"fold_ln": True, "center_writing_weights": True}),
        ("transcoder_ln2_1", "transcoder", "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out", {}, None),
        ("skip_transcoder_ln2_2", "skip_transcoder", "blocks.2.ln2.hook_normalized", "blocks.2.hook_mlp_out", {},
         None),
        ("jumprelu_transcoder_ln2_0", "jumprelu_transcoder", "blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out",
         {}, None),
        # Appended (seeds follow the index): a JumpReLU skip transcoder, and two dictionaries whose cfg.json is in
        # the pre-6.0 form SAELens still reads (flat keys, hook_point, activation_fn_str; see LEGACY_CFG).
        ("jumprelu_skip_transcoder_ln2_1", "jumprelu_skip_transcoder", "blocks.1.ln2.hook_normalized",
         "blocks.1.hook_mlp_out", {}, None),
        ("legacy_standard_resid_pre1", "standard", "blocks.1.hook_resid_pre", None, {"apply_b_dec_to_input": True},
         None),
        ("legacy_topk_resid_post2", "topk", "blocks.2.hook_resid_post", None, {"k": 8}, None),
        # Attention-output SAEs (heads concatenated, SAELens's reshape_activations: hook_z): SAELens's default model
        # keeps the value biases in hook_z, the second folds them out, as HexRay's trace does (GPT-2 has them).
        ("standard_z1", "standard", "blocks.1.attn.hook_z", None, {"reshape_activations": "hook_z"}, None),
        ("jumprelu_z2_folded", "jumprelu", "blocks.2.attn.hook_z", None, {"reshape_activations": "hook_z"},
         {"center_writing_weights": False, "fold_value_biases": True}),
    ],
    "llama": [
        ("standard_resid_pre1", "standard", "blocks.1.hook_resid_pre", None, {}, None),
        ("topk_resid_post1", "topk", "blocks.1.hook_resid_post", None, {"k": 8}, None),
        ("jumprelu_resid_mid0", "jumprelu", "blocks.0.hook_resid_mid", None, {}, None),
        ("gated_resid_post0", "gated", "blocks.0.hook_resid_post", None, {}, None),
        ("standard_bdec_resid_mid1", "standard", "blocks.1.hook_resid_mid", None, {"apply_b_dec_to_input": True},
         None),
        ("standard_norm_resid_post0", "standard", "blocks.0.hook_resid_post", None,
         {"normalize_activations": "expected_average_only_in"}, None),
        ("transcoder_ln2_0", "transcoder", "blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out", {}, None),
        ("skip_transcoder_ln2_1", "skip_transcoder", "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out", {},
         None),
        ("jumprelu_transcoder_resid_mid1", "jumprelu_transcoder", "blocks.1.hook_resid_mid", "blocks.1.hook_mlp_out",
         {}, None),
        ("topk_z1", "topk", "blocks.1.attn.hook_z", None, {"k": 8, "reshape_activations": "hook_z"}, None),  # GQA
    ],
}
DEFAULT_KWARGS = {"center_writing_weights": False}  # SAELens's default model_from_pretrained_kwargs


def legacy_cfg(name: str, hook_in: str, kind: str) -> dict | None:
    """A pre-6.0 SAELens cfg.json (what 3.x-5.x wrote), replacing the one save_model wrote for the legacy_* SAEs.
    The standard one omits apply_b_dec_to_input (SAELens then defaults it to True) and has no version (read as
    pre-6.0); the TopK one names its activation ``activation_fn_str: topk`` with ``activation_fn_kwargs.k``."""
    common = {"d_in": 64, "d_sae": D_SAE, "dtype": "float32", "device": "cpu", "model_name": f"hexray-reference-{kind}",
              "hook_point": hook_in, "hook_point_layer": int(hook_in.split(".")[1]), "hook_point_head_index": None,
              "context_size": 64, "prepend_bos": True, "dataset_path": "none",
              "model_from_pretrained_kwargs": DEFAULT_KWARGS, "normalize_activations": False}
    if name == "legacy_standard_resid_pre1":
        return {**common, "activation_fn_str": "relu", "sae_lens_training_version": "3.13.0"}
    if name == "legacy_topk_resid_post2":
        return {**common, "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 8},
                "apply_b_dec_to_input": False, "sae_lens_version": "5.5.0", "sae_lens_training_version": "5.5.0"}
    return None


def make_sae(arch: str, d_in: int, d_out: int | None, x: torch.Tensor, extra: dict, metadata: dict, seed: int):
    """A SAELens inference SAE of ``arch`` with seeded weights scaled to the activations ``x`` [n, d_in]."""
    import sae_lens as sl

    gen = torch.Generator().manual_seed(seed)
    classes = {
        "standard": (sl.StandardSAE, sl.StandardSAEConfig), "topk": (sl.TopKSAE, sl.TopKSAEConfig),
        "jumprelu": (sl.JumpReLUSAE, sl.JumpReLUSAEConfig), "gated": (sl.GatedSAE, sl.GatedSAEConfig),
        "transcoder": (sl.Transcoder, sl.TranscoderConfig), "skip_transcoder": (sl.SkipTranscoder,
                                                                               sl.SkipTranscoderConfig),
        "jumprelu_transcoder": (sl.JumpReLUTranscoder, sl.JumpReLUTranscoderConfig),
        "jumprelu_skip_transcoder": (sl.JumpReLUSkipTranscoder, sl.JumpReLUSkipTranscoderConfig),
    }
    sae_cls, cfg_cls = classes[arch]
    kw = {"d_in": d_in, "d_sae": D_SAE, "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": False}
    kw.update(extra)
    if d_out is not None:
        kw["d_out"] = d_out
    cfg = cfg_cls(**kw, metadata=sl.saes.sae.SAEMetadata(**metadata))
    sae = sae_cls(cfg)
    rms = float(x.pow(2).mean().sqrt())
    d_dec = d_out or d_in
    with torch.no_grad():
        sae.W_enc.copy_(_rand(gen, d_in, D_SAE, scale=1.0 / (rms * d_in ** 0.5)))
        sae.W_dec.copy_(_rand(gen, D_SAE, d_dec, scale=0.3 * rms))
        sae.b_dec.copy_(_rand(gen, d_dec, scale=0.1 * rms))
        sae_in = x - sae.b_dec if cfg.apply_b_dec_to_input else x
        pre = (sae_in @ sae.W_enc).double().numpy()
        if arch == "gated":
            sae.r_mag.copy_(_rand(gen, D_SAE, scale=0.2))
            sae.b_gate.copy_(torch.from_numpy(-_cut_between(pre, ACTIVE_FRACTION)).float())
            sae.b_mag.copy_(_rand(gen, D_SAE, scale=0.5).abs())  # magnitudes positive where the gate opens
        elif arch in ("jumprelu", "jumprelu_transcoder", "jumprelu_skip_transcoder"):
            # pre-activation = x W + b_enc; threshold > 0 cut so ~ACTIVE_FRACTION is above it.
            b = _rand(gen, D_SAE, scale=0.2)
            sae.b_enc.copy_(b)
            cut = _cut_between(pre + b.double().numpy(), ACTIVE_FRACTION)
            shift = np.minimum(cut - 0.05, 0.0)  # keep threshold >= 0.05 by lowering b_enc where needed
            sae.b_enc.copy_((b.double() - torch.from_numpy(shift)).float())
            sae.threshold.copy_(torch.from_numpy(cut - shift).float())
        elif arch == "topk":
            sae.b_enc.copy_(_rand(gen, D_SAE, scale=0.1))
        else:
            sae.b_enc.copy_(torch.from_numpy(-_cut_between(pre, ACTIVE_FRACTION)).float())
        if arch in ("skip_transcoder", "jumprelu_skip_transcoder"):
            sae.W_skip.copy_(_rand(gen, d_dec, d_in, scale=0.1 / d_in ** 0.5))
    return sae


def sae_margin(arch: str, sae, x: torch.Tensor) -> float:
    """How far the SAE's decisions are from flipping on ``x``: pre-activations from their cut (0, the JumpReLU
    threshold, the gate at 0), for TopK the gap between the k-th and (k+1)-th largest; relative to the largest."""
    w = {k: v.double().numpy() for k, v in sae.state_dict().items()}
    x = x.double().numpy() - (w["b_dec"] if sae.cfg.apply_b_dec_to_input else 0)
    if arch == "gated":
        return margin(x @ w["W_enc"] + w["b_gate"], 0.0)
    pre = x @ w["W_enc"] + w["b_enc"]
    if "threshold" in w:
        return margin(pre, w["threshold"])
    if arch == "topk":
        top = -np.sort(-pre, axis=-1)
        k = sae.cfg.k
        return float(min((top[:, k - 1] - top[:, k]).min(), np.abs(top[:, :k]).min()) / np.abs(pre).max())
    return margin(pre, 0.0)


def sae_fixtures(kind: str, folder: Path, tok, out: Path) -> dict:
    from sae_lens import SAE

    tokens = torch.tensor([encode(tok, PROMPTS[kind])])
    arrays = {"tokens": tokens[0].numpy().astype(np.int64)}
    info = {}
    models = {}
    sae_root = out / "sae" / kind
    if sae_root.exists():
        shutil.rmtree(sae_root)
    for i, (name, arch, hook_in, hook_out, extra, kwargs) in enumerate(SAE_SPECS[kind]):
        kwargs = dict(DEFAULT_KWARGS if kwargs is None else kwargs)
        key = json.dumps(kwargs, sort_keys=True)
        if key not in models:
            model = load_tl(folder, **kwargs)
            _, cache = model.run_with_cache(tokens)
            models[key] = cache
        cache = models[key]
        x_hook = cache[hook_in][0].float()  # hook_z: [n, n_heads, d_head], which SAELens reshapes itself
        x = x_hook.flatten(-2) if hook_in.endswith("hook_z") else x_hook
        d_out = cache[hook_out].shape[-1] if hook_out else None
        metadata = {"model_name": f"hexray-reference-{kind}", "model_class_name": "HookedTransformer",
                    "hook_name": hook_in, "hook_head_index": None, "prepend_bos": True, "context_size": 64,
                    "dataset_path": "none", "model_from_pretrained_kwargs": kwargs}
        if hook_out:
            metadata["hook_name_out"] = hook_out
        sae = make_sae(arch, x.shape[-1], d_out, x, extra, metadata, seed=1000 + i)
        path = sae_root / name
        sae.save_model(path)
        legacy = legacy_cfg(name, hook_in, kind)
        if legacy is not None:
            (path / "cfg.json").write_text(json.dumps(legacy))
        # The oracle: SAELens's own loader and encode on the activations of the model loaded as SAELens loads it.
        loaded = SAE.load_from_disk(str(path), device="cpu")
        assert loaded.cfg.architecture() == arch and loaded.cfg.apply_b_dec_to_input == sae.cfg.apply_b_dec_to_input
        assert loaded.cfg.metadata.hook_name == hook_in
        with torch.no_grad():
            acts = loaded.encode(x_hook)
            skip = arch in ("skip_transcoder", "jumprelu_skip_transcoder")
            recon = loaded.forward(x_hook) if skip else loaded.decode(acts)
        arrays[f"{name}/input"] = x.numpy()  # hook_z: heads concatenated, as the dictionary reads them
        arrays[f"{name}/feature_acts"] = acts.numpy()
        arrays[f"{name}/decoded"] = recon.reshape(x.shape).numpy()
        if hook_out:
            arrays[f"{name}/target"] = cache[hook_out][0].float().numpy()
        frac = float((acts > 0).float().mean())
        info[name] = {"architecture": arch, "hook_in": hook_in, "hook_out": hook_out,
                      "model_from_pretrained_kwargs": kwargs, "active_fraction": round(frac, 4),
                      "cfg": {k: v for k, v in extra.items()}, "legacy_cfg": legacy is not None,
                      "min_margin": float(f"{sae_margin(arch, loaded, x):.3g}")}
        print(f"  sae {kind}/{name}: {arch} @ {hook_in} active {frac:.2f}", flush=True)
    savez(out / f"sae_{kind}.npz", arrays)
    return info


# ---------------------------------------------------------------- circuit-tracer


def write_transcoders(kind: str, clt: bool, model, tokens, out: Path, seed: int) -> tuple[Path, dict]:
    """The fixture sets. GPT-2 per-layer: ReLU, with W_skip, reading ln2.hook_normalized. Llama per-layer: JumpReLU
    reading hook_resid_mid. Cross-layer: ReLU (GPT-2) / JumpReLU (Llama), reading hook_resid_mid."""
    name = f"{kind}_{'clt' if clt else 'plt'}"
    in_hook = "ln2.hook_normalized" if (kind == "gpt2" and not clt) else "hook_resid_mid"
    return write_transcoder_set(out / "transcoders" / name, model, tokens, clt=clt, in_hook=in_hook,
                                jump=kind == "llama", skip=kind == "gpt2" and not clt, d_tc=D_TC,
                                active_fraction=ACTIVE_FRACTION, seed=seed, model_name=f"hexray-reference-{kind}",
                                scan=f"hexray-reference/{name}")


def write_transcoder_set(folder: Path, model, tokens, *, clt: bool, in_hook: str, jump: bool, skip: bool, d_tc: int,
                         active_fraction: float, seed: int, model_name: str, scan: str) -> tuple[Path, dict]:
    """Seeded per-layer (or cross-layer) transcoders in circuit-tracer's on-disk format, scaled to the activations
    of ``model`` (a HookedTransformer) on ``tokens`` [1, n]: each feature is active on about ``active_fraction``
    of the positions after the first, with its cut halfway between two observed pre-activations."""
    from safetensors.torch import save_file

    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    out_hook = "hook_mlp_out"
    names = {f"blocks.{i}.{h}" for i in range(model.cfg.n_layers) for h in (in_hook, out_hook)}
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
    L, d = model.cfg.n_layers, model.cfg.d_model
    gen = torch.Generator().manual_seed(seed)
    files = []
    for layer in range(L):
        x = cache[f"blocks.{layer}.{in_hook}"][0].float()
        y = cache[f"blocks.{layer}.{out_hook}"][0].float()
        rms_x, rms_y = float(x.pow(2).mean().sqrt()), float(y.pow(2).mean().sqrt())
        W_enc = _rand(gen, d_tc, d, scale=1.0 / (rms_x * d ** 0.5))
        pre = (x[1:] @ W_enc.T).double().numpy()  # position 0 (BOS) is zeroed by circuit-tracer anyway
        b = _rand(gen, d_tc, scale=0.1)
        cut = _cut_between(pre + b.double().numpy(), active_fraction)
        if jump:
            shift = np.minimum(cut - 0.05, 0.0)
            b_enc = (b.double() - torch.from_numpy(shift)).float()
            threshold = torch.from_numpy(cut - shift).float()
        else:
            b_enc = (b.double() - torch.from_numpy(cut)).float()
        n_out = L - layer if clt else 1
        W_dec = _rand(gen, d_tc, n_out, d, scale=0.5 * rms_y / (d_tc * active_fraction) ** 0.5)
        b_dec = _rand(gen, d, scale=0.1 * rms_y)
        if clt:
            enc = {f"W_enc_{layer}": W_enc, f"b_enc_{layer}": b_enc, f"b_dec_{layer}": b_dec}
            if jump:
                enc[f"threshold_{layer}"] = threshold
            save_file({k: v.contiguous() for k, v in enc.items()}, folder / f"W_enc_{layer}.safetensors")
            save_file({f"W_dec_{layer}": W_dec.contiguous()}, folder / f"W_dec_{layer}.safetensors")
        else:
            t = {"W_enc": W_enc, "W_dec": W_dec[:, 0], "b_enc": b_enc, "b_dec": b_dec}
            if jump:
                t["activation_function.threshold"] = threshold
            if skip:
                t["W_skip"] = _rand(gen, d, d, scale=0.3 * rms_y / (rms_x * d ** 0.5))
            save_file({k: v.contiguous() for k, v in t.items()}, folder / f"layer_{layer}.safetensors")
            files.append(f"layer_{layer}.safetensors")
    config = {"model_kind": "cross_layer_transcoder" if clt else "transcoder_set", "model_name": model_name,
              "feature_input_hook": in_hook, "feature_output_hook": out_hook, "scan": scan}
    if not clt:
        config["transcoders"] = files
    import yaml

    (folder / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return folder, config


def load_set(folder: Path, config: dict):
    """The transcoders as circuit-tracer loads them from disk (paths resolved against the folder)."""
    if config["model_kind"] == "transcoder_set":
        from circuit_tracer.transcoder.single_layer_transcoder import load_transcoder_set

        paths = {i: str(folder / p) for i, p in enumerate(config["transcoders"])}
        return load_transcoder_set(paths, scan=config["scan"], feature_input_hook=config["feature_input_hook"],
                                   feature_output_hook=config["feature_output_hook"], device=torch.device("cpu"),
                                   dtype=torch.float32, lazy_encoder=False, lazy_decoder=False)
    from circuit_tracer.transcoder.cross_layer_transcoder import load_clt

    return load_clt(str(folder), feature_input_hook=config["feature_input_hook"],
                    feature_output_hook=config["feature_output_hook"], scan=config["scan"],
                    device=torch.device("cpu"), dtype=torch.float32, lazy_decoder=False, lazy_encoder=False)


def _thresholds(tset, config: dict, L: int) -> np.ndarray | None:
    """The JumpReLU thresholds [L, d_tc] of a loaded set, or None for ReLU."""
    if config["model_kind"] == "cross_layer_transcoder":
        act = tset.activation_function
        return act.threshold.detach().reshape(L, -1).double().numpy() if hasattr(act, "threshold") else None
    acts = [t.activation_function for t in tset]
    if not hasattr(acts[0], "threshold"):
        return None
    return torch.stack([a.threshold.detach().reshape(-1) for a in acts]).double().numpy()


def circuit_tracer_graph(folder: Path, tc_folder: Path, config: dict, tokens: torch.Tensor, *, batch_size: int = 256,
                         max_feature_nodes: int | None = None, prune: bool = True) -> tuple[dict, dict]:
    """circuit-tracer's encode, attribution graph and pruning for ``tokens`` [n] on the model in ``folder``, loaded
    as circuit-tracer loads it; returns the arrays of a graph npz (README) and a summary."""
    from circuit_tracer import attribute
    from circuit_tracer.graph import prune_graph
    from circuit_tracer.replacement_model.replacement_model_transformerlens import TransformerLensReplacementModel
    from transformer_lens import HookedTransformer

    allow_local_folders()
    # circuit-tracer's own load: HookedTransformer.from_pretrained(fold_ln/centring/center_unembed all off).
    plain = HookedTransformer.from_pretrained(tl_path(folder), fold_ln=False, center_writing_weights=False,
                                              center_unembed=False, device="cpu")
    tset = load_set(tc_folder, config)
    L = plain.cfg.n_layers
    with torch.no_grad():
        logits, cache = plain.run_with_cache(tokens[None])
    x = torch.stack([cache[f"blocks.{i}.{config['feature_input_hook']}"][0] for i in range(L)])
    y = torch.stack([cache[f"blocks.{i}.{config['feature_output_hook']}"][0] for i in range(L)])
    with torch.no_grad():
        acts = tset.encode(x)  # [L, n_pos, d_tc]; circuit-tracer's encode does not zero BOS
        pre = torch.stack([tset.encode_layer(x[i], i, apply_activation_function=False) if config["model_kind"] ==
                           "cross_layer_transcoder" else tset[i].encode(x[i], apply_activation_function=False)
                           for i in range(L)])[:, 1:].double().numpy()
    thr = _thresholds(tset, config, L)
    cut_margin = margin(pre, 0.0 if thr is None else thr[:, None, :])
    arrays = {"tokens": tokens.numpy().astype(np.int64), "input": x.numpy(), "mlp_out": y.numpy(),
              "feature_acts": acts.numpy(), "last_logits": logits[0, -1].float().numpy()}
    del cache, plain

    model = TransformerLensReplacementModel.from_pretrained_and_transcoders(tl_path(folder), tset, device="cpu")
    graph = attribute(tokens, model, batch_size=batch_size, max_feature_nodes=max_feature_nodes, verbose=False)
    A = graph.adjacency_matrix.float()
    n_feat, n_pos, n_logit = len(graph.selected_features), len(tokens), len(graph.logit_targets)
    assert A.shape[0] == n_feat + L * n_pos + n_pos + n_logit
    arrays.update({
        "active_features": graph.active_features.numpy().astype(np.int64),
        "selected_features": graph.selected_features.numpy().astype(np.int64),
        "feature_nodes": graph.active_features[graph.selected_features].numpy().astype(np.int64),
        "activation_values": graph.activation_values.float().numpy(),
        "logit_token_ids": np.array([t.vocab_idx for t in graph.logit_targets], dtype=np.int64),
        "logit_probabilities": graph.logit_probabilities.float().numpy(),
        "adjacency": A.numpy(),
    })
    info = {"model_kind": config["model_kind"], "feature_input_hook": config["feature_input_hook"],
            "feature_output_hook": config["feature_output_hook"], "n_features": n_feat, "n_nodes": int(A.shape[0]),
            "n_logits": n_logit, "n_pos": n_pos, "nonzero_edges": int((A != 0).sum()),
            "min_margin": float(f"{cut_margin:.3g}")}
    if prune:
        pruned = prune_graph(graph, NODE_THRESHOLD, EDGE_THRESHOLD)
        arrays.update({"node_mask": pruned.node_mask.numpy(), "edge_mask": pruned.edge_mask.numpy(),
                       "cumulative_scores": pruned.cumulative_scores.float().numpy()})
        info.update(pruned_nodes=int(pruned.node_mask.sum()), pruned_edges=int(pruned.edge_mask.sum()))
    return arrays, info


def graph_fixtures(kind: str, folder: Path, tok, out: Path) -> dict:
    from transformer_lens import HookedTransformer

    allow_local_folders()
    tokens = torch.tensor(encode(tok, PROMPTS[kind]))
    info = {}
    for clt in (False, True):
        plain = HookedTransformer.from_pretrained(tl_path(folder), fold_ln=False, center_writing_weights=False,
                                                  center_unembed=False, device="cpu")
        tc_folder, config = write_transcoders(kind, clt, plain, tokens[None], out, seed=2000 + 10 * clt
                                              + (kind == "llama"))
        arrays, info[tc_folder.name] = circuit_tracer_graph(folder, tc_folder, config, tokens)
        savez(out / f"graph_{tc_folder.name}.npz", arrays)
        print(f"  graph {tc_folder.name}: {info[tc_folder.name]}", flush=True)
    return info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(REPO / "tests" / "fixtures" / "reference"))
    ap.add_argument("--only", default="gpt2,llama")
    ap.add_argument("--skip-graphs", action="store_true")
    args = ap.parse_args(argv)
    torch.set_grad_enabled(True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {"models": {}}
    manifest["versions"] = {p: version(p) for p in ("torch", "transformers", "tokenizers", "transformer-lens",
                                                     "sae-lens", "circuit-tracer", "safetensors", "numpy")}
    manifest["python"] = sys.version.split()[0]
    for kind in args.only.split(","):
        print(f"{kind}:", flush=True)
        folder, tok = save_model(kind, out)
        entry = {"folder": kind, "prompt": PROMPTS[kind], "token_ids": encode(tok, PROMPTS[kind]),
                 "bos_token_id": tok.bos_token_id, "d_vocab": len(tok)}
        entry["saes"] = sae_fixtures(kind, folder, tok, out)
        if not args.skip_graphs:
            entry["graphs"] = graph_fixtures(kind, folder, tok, out)
        elif "graphs" in manifest["models"].get(kind, {}):  # the graph files stay: so does their description
            entry["graphs"] = manifest["models"][kind]["graphs"]
        manifest["models"][kind] = entry
        manifest_path.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
