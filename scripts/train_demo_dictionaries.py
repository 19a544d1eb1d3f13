#!/usr/bin/env python3
"""Train the demo dictionaries of features for the embedded model `hexray-demo`, offline, with torch.

    apt-get download r-cran-janeaustenr && dpkg -x r-cran-janeaustenr_*.deb /tmp/ja
    python scripts/train_demo_dictionaries.py --austen-dir /tmp/ja

writes, next to the model (hexray_core/models/):

  hexray-demo-sae/          a residual-stream sparse autoencoder at blocks.2.hook_resid_pre (SAELens folder:
                            cfg.json + sae_weights.safetensors; TopK, k = 16, 1024 features), trained on the
                            raw residual (SAELens's default model_from_pretrained_kwargs: LayerNorm folded, which
                            leaves the residual unchanged, not centred)
  hexray-demo-transcoders/  one ReLU transcoder per layer (circuit-tracer set: config.yaml + layer_i.safetensors;
                            512 features each) reading what the MLP reads (mlp.hook_in: ln_2's output, weight and
                            bias included) and writing the MLP's output (hook_mlp_out)
  MODEL_CARD.md in each     L0, fraction of variance explained and cross-entropy loss recovered on held-out text,
                            measured after reloading the saved (float16) weights with HexRay's own numpy loader

The corpus is the demo model's (scripts/train_demo_model.py): Jane Austen's six novels, the last 2% of the
token stream (the end of Persuasion) held out. Our own small trainer: Adam, TopK for the SAE, an L1 penalty
weighted by decoder norms for the transcoders with its coefficient steered towards a target L0.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "scripts"))
MODELS = os.path.join(REPO, "hexray_core", "models")
SAE_LAYER = 2


def load_model():
    from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast

    folder = os.path.join(MODELS, "hexray-demo")
    model = GPT2LMHeadModel.from_pretrained(folder).eval()
    tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(folder, "tokenizer.json"))
    return model, tok


def token_stream(austen_dir: str, tok) -> torch.Tensor:
    from train_demo_model import EOT, read_austen

    eot = tok.convert_tokens_to_ids(EOT)
    stream = []
    for d in read_austen(austen_dir):
        stream += tok.encode(d) + [eot]
    return torch.tensor(stream, dtype=torch.long), eot


def batches(data: torch.Tensor, bos: int, ctx: int, n: int, seed: int) -> torch.Tensor:
    """n sequences of ctx tokens, BOS first (as HexRay records a prompt)."""
    g = torch.Generator().manual_seed(seed)
    ix = torch.randint(0, len(data) - ctx, (n,), generator=g)
    seqs = torch.stack([data[i:i + ctx - 1] for i in ix])
    return torch.cat([torch.full((n, 1), bos), seqs], 1)


@torch.no_grad()
def activations(model, seqs: torch.Tensor, batch: int = 32) -> dict:
    """Per token (BOS dropped): the residual before SAE_LAYER, and each MLP's input and output."""
    blocks = model.transformer.h
    got: dict = {}
    hooks = []
    for i, b in enumerate(blocks):
        hooks.append(b.mlp.register_forward_hook(
            lambda m, inp, out, i=i: got.setdefault(("in", i), []).append(inp[0][:, 1:].reshape(-1, inp[0].shape[-1]))
            or got.setdefault(("out", i), []).append(out[:, 1:].reshape(-1, out.shape[-1]))))
    for s in range(0, len(seqs), batch):
        out = model(seqs[s:s + batch], output_hidden_states=True)
        h = out.hidden_states[SAE_LAYER]
        got.setdefault(("resid", SAE_LAYER), []).append(h[:, 1:].reshape(-1, h.shape[-1]))
    for h in hooks:
        h.remove()
    return {k: torch.cat(v) for k, v in got.items()}


# -- training ----------------------------------------------------------------------------------------------------------

BATCH = 512


def train_topk_sae(x: torch.Tensor, d_sae: int, k: int, steps: int, seed: int) -> dict:
    torch.manual_seed(seed)
    d = x.shape[1]
    w_dec = torch.randn(d_sae, d)
    w_dec = w_dec / w_dec.norm(dim=1, keepdim=True)
    params = {"W_enc": torch.nn.Parameter(w_dec.T.clone()), "b_enc": torch.nn.Parameter(torch.zeros(d_sae)),
              "W_dec": torch.nn.Parameter(w_dec.clone()), "b_dec": torch.nn.Parameter(x.mean(0).clone())}
    opt = torch.optim.Adam(params.values(), lr=2e-3)
    var = (x - x.mean(0)).pow(2).sum(1).mean()
    for step in range(steps):
        xb = x[torch.randint(0, len(x), (BATCH,))]
        pre = (xb - params["b_dec"]) @ params["W_enc"] + params["b_enc"]
        top = pre.topk(k, dim=-1)
        f = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
        recon = f @ params["W_dec"] + params["b_dec"]
        loss = (recon - xb).pow(2).sum(1).mean() / var
        opt.zero_grad()
        loss.backward()
        for g in opt.param_groups:
            g["lr"] = 2e-3 * min(1.0, (step + 1) / 100) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        opt.step()
        with torch.no_grad():  # unit decoder rows: activations carry the scale
            params["W_dec"] /= params["W_dec"].norm(dim=1, keepdim=True)
        if step % 100 == 0:
            print(f"  sae step {step}: normalised MSE {loss.item():.4f}", flush=True)
    return {k: v.detach() for k, v in params.items()}


def train_transcoder(x: torch.Tensor, y: torch.Tensor, d_tc: int, target_l0: float, steps: int, seed: int) -> dict:
    torch.manual_seed(seed)
    d_in, d_out = x.shape[1], y.shape[1]
    w_dec = torch.randn(d_tc, d_out)
    w_dec = 0.1 * w_dec / w_dec.norm(dim=1, keepdim=True)
    params = {"W_enc": torch.nn.Parameter(torch.randn(d_in, d_tc) / math.sqrt(d_in)),
              "b_enc": torch.nn.Parameter(torch.zeros(d_tc)), "W_dec": torch.nn.Parameter(w_dec),
              "b_dec": torch.nn.Parameter(y.mean(0).clone())}
    opt = torch.optim.Adam(params.values(), lr=2e-3)
    var = (y - y.mean(0)).pow(2).sum(1).mean()
    lam, l0_avg = 3e-3, None
    for step in range(steps):
        ix = torch.randint(0, len(x), (BATCH,))
        xb, yb = x[ix], y[ix]
        f = torch.relu(xb @ params["W_enc"] + params["b_enc"])
        recon = f @ params["W_dec"] + params["b_dec"]
        mse = (recon - yb).pow(2).sum(1).mean() / var
        sparsity = (f * params["W_dec"].norm(dim=1)).sum(1).mean()
        loss = mse + lam * sparsity
        opt.zero_grad()
        loss.backward()
        for g in opt.param_groups:
            g["lr"] = 2e-3 * min(1.0, (step + 1) / 100) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        opt.step()
        l0 = (f > 0).float().sum(1).mean().item()
        l0_avg = l0 if l0_avg is None else 0.95 * l0_avg + 0.05 * l0
        if step > 50 and step % 10 == 0:  # steer the L1 coefficient towards the target L0
            lam *= math.exp(0.15 * math.tanh(math.log(l0_avg / target_l0)))
        if step % 100 == 0:
            print(f"  transcoder step {step}: normalised MSE {mse.item():.4f}, L0 {l0_avg:.1f}, l1 {lam:.2e}",
                  flush=True)
    return {k: v.detach() for k, v in params.items()}


# -- saving (float16) in the formats HexRay reads ---------------------------------------------------------------------

def half(t: torch.Tensor) -> np.ndarray:
    return t.to(torch.float16).contiguous().numpy()


def save_sae(p: dict, k: int, folder: str) -> None:
    from safetensors.numpy import save_file

    os.makedirs(folder, exist_ok=True)
    d_in, d_sae = p["W_enc"].shape
    save_file({n: half(v) for n, v in p.items()}, os.path.join(folder, "sae_weights.safetensors"))
    cfg = {"architecture": "topk", "d_in": d_in, "d_sae": d_sae, "k": k, "dtype": "float16",
           "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
           "rescale_acts_by_decoder_norm": False,
           "metadata": {"model_name": "hexray-demo", "hook_name": f"blocks.{SAE_LAYER}.hook_resid_pre",
                        "hook_head_index": None, "prepend_bos": True, "context_size": 128,
                        "model_from_pretrained_kwargs": {"center_writing_weights": False},
                        "sae_lens_version": "6.54.12", "sae_lens_training_version": "hexray-demo"}}
    with open(os.path.join(folder, "cfg.json"), "w") as f:
        json.dump(cfg, f, indent=1)


def save_transcoders(ps: list[dict], folder: str) -> None:
    import yaml
    from safetensors.numpy import save_file

    os.makedirs(folder, exist_ok=True)
    for i, p in enumerate(ps):  # circuit-tracer keeps W_enc as [d_tc, d_in]
        save_file({"W_enc": half(p["W_enc"].T), "b_enc": half(p["b_enc"]), "W_dec": half(p["W_dec"]),
                   "b_dec": half(p["b_dec"])}, os.path.join(folder, f"layer_{i}.safetensors"))
    with open(os.path.join(folder, "config.yaml"), "w") as f:
        yaml.safe_dump({"model_name": "hexray-demo", "model_kind": "transcoder_set",
                        "feature_input_hook": "mlp.hook_in", "feature_output_hook": "hook_mlp_out",
                        "scan": "hexray-demo-transcoders",
                        "transcoders": [f"layer_{i}.safetensors" for i in range(len(ps))]}, f, sort_keys=False)


# -- evaluation with the saved weights, through HexRay's numpy loader -------------------------------------------------

def _patch_resid(patch, i, args, kw):
    if args:
        return (patch("resid", i, args[0]), *args[1:]), kw
    return args, {**kw, "hidden_states": patch("resid", i, kw["hidden_states"])}


@torch.no_grad()
def ce_loss(model, seqs: torch.Tensor, patch=None) -> float:
    """Mean next-token cross-entropy; ``patch(kind, layer, tensor) -> tensor`` replaces activations."""
    hooks = []
    if patch is not None:
        for i, b in enumerate(model.transformer.h):
            hooks.append(b.register_forward_pre_hook(lambda m, args, kw, i=i: _patch_resid(patch, i, args, kw),
                                                     with_kwargs=True))
            hooks.append(b.mlp.register_forward_hook(lambda m, inp, out, i=i: patch("mlp", i, out, inp[0])))
    try:
        total, count = 0.0, 0
        for s in range(0, len(seqs), 32):
            x = seqs[s:s + 32]
            logits = model(x).logits[:, :-1]
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                                     reduction="sum")
            total, count = total + loss.item(), count + x[:, 1:].numel()
        return total / count
    finally:
        for h in hooks:
            h.remove()


def _apply(d, x: torch.Tensor, *, keep_bos: bool) -> torch.Tensor:
    """The dictionary's reconstruction of x [batch, pos, d] (numpy, as HexRay computes it); BOS left alone."""
    flat = x.reshape(-1, x.shape[-1]).numpy()
    out = torch.from_numpy(d.forward(flat)).reshape(x.shape).to(x.dtype)
    if keep_bos:
        out[:, 0] = x[:, 0]
    return out


def _stats(d, x, y) -> dict:
    f = d.encode(x.numpy())
    recon = d.forward(x.numpy())
    yy = y.numpy()
    fvu = float(((recon - yy) ** 2).sum() / ((yy - yy.mean(0)) ** 2).sum())
    return {"l0": float((f > 0).sum(1).mean()), "variance_explained": 1 - fvu,
            "dead_fraction": float(((f > 0).sum(0) == 0).mean())}


def evaluate(model, seqs, acts, sae=None, tcs=None) -> dict:
    clean = ce_loss(model, seqs)
    report = {"clean_ce": clean, "eval_tokens": int(seqs[:, 1:].numel())}
    if sae is not None:
        x = acts[("resid", SAE_LAYER)]
        s = _stats(sae, x, x)

        def sae_patch(kind, layer, t, *rest):
            return _apply(sae, t, keep_bos=True) if kind == "resid" and layer == SAE_LAYER else t

        def zero_resid(kind, layer, t, *rest):
            if kind == "resid" and layer == SAE_LAYER:
                z = torch.zeros_like(t)
                z[:, 0] = t[:, 0]
                return z
            return t

        with_sae, ablated = ce_loss(model, seqs, sae_patch), ce_loss(model, seqs, zero_resid)
        s.update({"ce_with_dictionary": with_sae, "ce_zero_ablation": ablated,
                  "ce_loss_recovered": (ablated - with_sae) / (ablated - clean)})
        report["sae"] = s
    if tcs is None:
        return report
    report["transcoders"] = []
    for i, d in enumerate(tcs):
        s = _stats(d, acts[("in", i)], acts[("out", i)])

        def tc_patch(kind, layer, t, inp=None, i=i, d=d):
            return _apply(d, inp, keep_bos=False) if kind == "mlp" and layer == i else t

        def zero_mlp(kind, layer, t, inp=None, i=i):
            return torch.zeros_like(t) if kind == "mlp" and layer == i else t

        with_tc, ablated = ce_loss(model, seqs, tc_patch), ce_loss(model, seqs, zero_mlp)
        s.update({"layer": i, "ce_with_dictionary": with_tc, "ce_zero_ablation": ablated,
                  "ce_loss_recovered": (ablated - with_tc) / (ablated - clean)})
        report["transcoders"].append(s)

    def all_tc(kind, layer, t, inp=None):
        return _apply(tcs[layer], inp, keep_bos=False) if kind == "mlp" else t

    def all_zero(kind, layer, t, inp=None):
        return torch.zeros_like(t) if kind == "mlp" else t

    with_all, zero_all = ce_loss(model, seqs, all_tc), ce_loss(model, seqs, all_zero)
    report["transcoders_all_layers"] = {"ce_with_dictionary": with_all, "ce_zero_ablation": zero_all,
                                        "ce_loss_recovered": (zero_all - with_all) / (zero_all - clean)}
    return report


def sae_card(report: dict, args, seconds: float) -> str:
    s = report["sae"]
    ces = f"{report['clean_ce']:.3f} / {s['ce_with_dictionary']:.3f} / {s['ce_zero_ablation']:.3f}"
    sae = f"""# hexray-demo-sae

A residual-stream sparse autoencoder for the embedded model `hexray-demo`, trained by
`scripts/train_demo_dictionaries.py` (HexRay's own small trainer, torch, CPU).

- reads `blocks.{SAE_LAYER}.hook_resid_pre`, the raw residual stream (SAELens's default space: LayerNorm folded,
  writing weights not centred; HexRay rebuilds it from a trace and the model kit)
- SAELens folder, architecture `topk` (k = {args.k}), {args.sae_features} features, float16 weights
- trained on {args.train_seqs} × 128-token windows of the demo model's corpus (Jane Austen's six novels),
  {args.steps} Adam steps of {args.batch}; evaluated on {report['eval_tokens']:,} held-out tokens (the end of
  *Persuasion*)

| metric | value |
|---|---|
| L0 (active features per token) | {s['l0']:.1f} |
| fraction of variance explained | {s['variance_explained']:.3f} |
| cross-entropy loss recovered | {s['ce_loss_recovered']:.3f} |
| CE: clean / with the SAE spliced in / residual zero-ablated | {ces} |
| features never active on the held-out text | {s['dead_fraction']:.1%} |

Measured after reloading the saved float16 weights with `hexray.load_dictionary` (numpy). Training took
{seconds:.0f} s (a shared 2-vCPU VM, heavily loaded, no GPU).
"""
    return sae


def tc_card(report: dict, args, seconds: float | None) -> str:
    took = (f"Training took {seconds:.0f} s" if seconds is not None else
            "Each layer was trained in its own process (--tc-layer), then assembled")
    rows = "\n".join(f"| {t['layer']} | {t['l0']:.1f} | {t['variance_explained']:.3f} | {t['ce_loss_recovered']:.3f} | "
                     f"{t['ce_with_dictionary']:.3f} / {t['ce_zero_ablation']:.3f} | {t['dead_fraction']:.1%} |"
                     for t in report["transcoders"])
    a = report["transcoders_all_layers"]
    tcs = f"""# hexray-demo-transcoders

Per-layer transcoders for the embedded model `hexray-demo`, trained by `scripts/train_demo_dictionaries.py`
(HexRay's own small trainer, torch, CPU).

- each reads what its MLP reads (`mlp.hook_in`: `ln_2`'s output with its weight and bias) and predicts the MLP's
  output (`hook_mlp_out`), in the unprocessed model's space (circuit-tracer's convention)
- circuit-tracer transcoder set (`config.yaml` + `layer_i.safetensors`), ReLU, {args.tc_features} features per
  layer, float16 weights; trained with an L1 penalty weighted by decoder norms, its coefficient steered towards
  L0 ≈ {args.target_l0:g}
- {args.train_seqs} × 128-token training windows of Jane Austen's novels, {args.steps} Adam steps of {args.batch};
  evaluated on
  {report['eval_tokens']:,} held-out tokens (the end of *Persuasion*); clean CE {report['clean_ce']:.3f}

| layer | L0 | variance explained | CE loss recovered | CE with transcoder / MLP zero-ablated | never active |
|---|---|---|---|---|---|
{rows}

All four spliced in at once: CE {a['ce_with_dictionary']:.3f} (MLPs zero-ablated: {a['ce_zero_ablation']:.3f}),
loss recovered {a['ce_loss_recovered']:.3f}. Measured after reloading the saved float16 weights with
`hexray.load_dictionary` (numpy). {took} (a shared 2-vCPU VM, heavily loaded, no GPU).
"""
    return tcs


def _write_card(folder: str, card: str, report: dict) -> None:
    print(json.dumps(report, indent=1), flush=True)
    with open(os.path.join(folder, "MODEL_CARD.md"), "w") as f:
        f.write(card)
    with open(os.path.join(folder, "evaluation.json"), "w") as f:
        json.dump(report, f, indent=1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--austen-dir", required=True, help="where r-cran-janeaustenr's .deb was extracted")
    ap.add_argument("--out", default=MODELS)
    ap.add_argument("--train-seqs", type=int, default=800)
    ap.add_argument("--eval-seqs", type=int, default=64)
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--sae-features", type=int, default=1024)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--tc-features", type=int, default=512)
    ap.add_argument("--target-l0", type=float, default=24)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=BATCH)
    ap.add_argument("--only", choices=["sae", "transcoders"], help="train one of the two (default both)")
    ap.add_argument("--tc-layer", type=int, help="train only this layer's transcoder into --params-dir")
    ap.add_argument("--params-dir", help="trained transcoder layers are kept (and reused) here")
    ap.add_argument("--tokens-cache", help="keep the tokenized corpus here (.npy) to skip reading it again")
    args = ap.parse_args()
    globals()["BATCH"] = args.batch
    torch.set_num_threads(args.threads)
    t0 = time.time()
    model, tok = load_model()
    if args.tokens_cache and os.path.exists(args.tokens_cache):
        data, eot = torch.from_numpy(np.load(args.tokens_cache)), tok.convert_tokens_to_ids("<|endoftext|>")
    else:
        data, eot = token_stream(args.austen_dir, tok)
        if args.tokens_cache:
            np.save(args.tokens_cache, data.numpy())
    n_val = max(len(data) // 50, 128 * 40)  # as train_demo_model.py: the last 2% is held out
    train, val = data[:-n_val], data[-n_val:]
    acts = activations(model, batches(train, eot, 128, args.train_seqs, seed=1))
    print(f"{len(data):,} tokens; {len(acts[('resid', SAE_LAYER)]):,} training activations "
          f"({time.time() - t0:.0f} s)", flush=True)
    sae_dir, tc_dir = os.path.join(args.out, "hexray-demo-sae"), os.path.join(args.out, "hexray-demo-transcoders")
    from hexray_core.replay.dictionary import load_dictionary

    eval_seqs = batches(val, eot, 128, args.eval_seqs, seed=2)
    eval_acts = activations(model, eval_seqs)
    if args.only in (None, "sae"):
        t1 = time.time()
        save_sae(train_topk_sae(acts[("resid", SAE_LAYER)], args.sae_features, args.k, args.steps, seed=0), args.k,
                 sae_dir)
        seconds = time.time() - t1
        report = evaluate(model, eval_seqs, eval_acts, sae=load_dictionary(sae_dir)[SAE_LAYER])
        _write_card(sae_dir, sae_card(report, args, seconds), report)
    if args.only in (None, "transcoders"):
        t1 = time.time()
        layers = range(model.config.n_layer) if args.tc_layer is None else [args.tc_layer]
        tc_ps = {}
        for i in layers:
            saved = os.path.join(args.params_dir or "", f"tc_layer_{i}.pt")
            if args.params_dir and os.path.exists(saved):
                tc_ps[i] = torch.load(saved)
                continue
            tc_ps[i] = train_transcoder(acts[("in", i)], acts[("out", i)], args.tc_features, args.target_l0,
                                        args.steps, seed=10 + i)
            if args.params_dir:
                os.makedirs(args.params_dir, exist_ok=True)
                torch.save(tc_ps[i], saved)
        if args.tc_layer is not None:  # one layer of a set trained by parallel processes; a last run assembles it
            return 0
        tc_ps = [tc_ps[i] for i in range(model.config.n_layer)]
        save_transcoders(tc_ps, tc_dir)
        seconds = None if args.params_dir else time.time() - t1
        tcs = load_dictionary(tc_dir)
        report = evaluate(model, eval_seqs, eval_acts, tcs=[tcs[i] for i in sorted(tcs.layers)])
        _write_card(tc_dir, tc_card(report, args, seconds), report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
