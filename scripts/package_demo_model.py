#!/usr/bin/env python3
"""Install a checkpoint written by train_demo_model.py as HexRay's embedded demo model.

Copies the Hugging Face files into hexray_core/models/hexray-demo/, measures what the model card
reports (held-out loss against a unigram baseline, probe predictions) and writes MODEL_CARD.md.

    python scripts/package_demo_model.py /tmp/demo-train/out --austen-dir /tmp/ja --hardware "..."
"""

# ruff: noqa: E501  (the model card template below is Markdown, line by line)
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_demo_model import EOT, evaluate, fetch_austen, read_austen  # noqa: E402

DEST = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "hexray_core", "models", "hexray-demo")
FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
         "training_report.json")
PROBES = [
    "He spoke with the greatest kindness, and the rest of",
    '"I am very glad to see you,"',
    "I do not",
    "She could not help",
    "It is a truth universally",
    "Lady Catherine de",
    "Mr.",
    "In the course of the",
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("--austen-dir")
    ap.add_argument("--hardware", required=True, help="where training ran, for the model card")
    args = ap.parse_args()
    from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast

    os.makedirs(DEST, exist_ok=True)
    for f in FILES:
        if os.path.exists(os.path.join(args.checkpoint, f)):
            shutil.copy2(os.path.join(args.checkpoint, f), os.path.join(DEST, f))
    report = json.load(open(os.path.join(DEST, "training_report.json")))
    model = GPT2LMHeadModel.from_pretrained(DEST).eval()
    tok = PreTrainedTokenizerFast.from_pretrained(DEST)

    # Held-out data exactly as training split it: the last 2% of the token stream.
    docs = read_austen(args.austen_dir or fetch_austen())
    eot = tok.convert_tokens_to_ids(EOT)
    stream = []
    for d in docs:
        stream += tok.encode(d) + [eot]
    data = torch.tensor(stream)
    ctx = report["args"]["ctx"]
    n_val = max(len(data) // 50, ctx * 40)
    train, val = data[:-n_val], data[-n_val:]
    with torch.no_grad():
        val_loss = evaluate(model, val, ctx, batches=40, seed=1)
    model.eval()  # evaluate() leaves the model in training mode (dropout on)
    counts = torch.bincount(train, minlength=len(tok)).double() + 1.0  # add-one smoothed unigram
    logp = (counts / counts.sum()).log()
    unigram = float(-logp[val].mean())

    rows = []
    with torch.no_grad():
        for prompt in PROBES:
            ids = torch.tensor([[eot] + tok.encode(prompt)])  # BOS first, as hexray records it
            p = model(ids).logits[0, -1].softmax(-1)
            top = torch.topk(p, 3)
            pairs = zip(top.values, top.indices, strict=True)
            rows.append((prompt, [(tok.decode([int(i)]), float(v)) for v, i in pairs]))
    params = sum(p.numel() for p in model.parameters())
    cfg = model.config
    a = report["args"]
    sizes = {f: os.path.getsize(os.path.join(DEST, f)) for f in FILES if os.path.exists(os.path.join(DEST, f))}
    probe_table = "\n".join(
        f"| `{json.dumps(p)[1:-1]}` | " + ", ".join(f"`{json.dumps(t)[1:-1]}` {v:.1%}" for t, v in top) + " |"
        for p, top in rows
    )
    card = f"""# hexray-demo: HexRay's embedded model

A small GPT-2-architecture language model trained by HexRay on Jane Austen's novels, shipped inside
the package so that `hexray` runs on a real, trained model with no network. Load it with
`--model hexray-demo`. It is a teaching and testing model, not a useful language model.

| | |
|---|---|
| architecture | `GPT2LMHeadModel`: {cfg.n_layer} layers, d_model {cfg.n_embd}, {cfg.n_head} heads, d_mlp {4 * cfg.n_embd}, \
context {cfg.n_positions}, GELU (new), tied embeddings |
| parameters | {params:,} |
| tokenizer | byte-level BPE (GPT-2 pre-tokenizer and byte alphabet), {len(tok):,} tokens, trained on the corpus; \
`<\\|endoftext\\|>` is BOS/EOS. Byte-level, so tokens that split a multi-byte character occur as with GPT-2 |
| data | the six novels of Jane Austen (public domain), from Debian's `r-cran-janeaustenr` package (MIT); \
{sum(map(len, docs)) / 1e6:.2f} M characters, {len(train):,} training tokens; held out: the last 2% of the \
token stream ({len(val):,} tokens, the end of *Persuasion*) |
| training | {report['steps']:,} steps of {a['batch']} × {a['ctx']} tokens ({report['tokens_seen'] / 1e6:.1f} M tokens, \
{report['tokens_seen'] / len(train):.1f} epochs), AdamW lr {a['lr']} cosine, dropout {a['dropout']}, bf16 autocast, \
seed {a['seed']}; {report['train_sec'] / 60:.0f} min on {args.hardware} |
| held-out loss | **{val_loss:.3f} nats/token** (perplexity {math.exp(val_loss):.0f}); add-one unigram baseline \
{unigram:.3f} nats/token |
| files | {', '.join(f'`{f}` {s / 1e6:.2f} MB' for f, s in sizes.items())} |
| recipe | `python scripts/train_demo_model.py --tokenizer bpe --vocab-size {a['vocab_size']} --n-layer {a['n_layer']} \
--d-model {a['d_model']} --n-head {a['n_head']} --amp --max-steps {a['max_steps']} --dropout {a['dropout']} --out DIR`, \
then `python scripts/package_demo_model.py DIR --hardware "..."` |

## Probes

Top three next-token predictions after `<|endoftext|>` + prompt, which is how `hexray record`
feeds it (TransformerLens prepends BOS); measured by `scripts/package_demo_model.py`:

| prompt | predictions |
|---|---|
{probe_table}

## Limitations

- Tiny and trained on 1 M tokens of one author: it knows Austen's names, dialogue tags and function
  words, not facts about the world. Outside 19th-century English prose it is guessing.
- Greedy decoding falls into loops ("I am sure I am sure ..."); sampled text is Austen-flavoured but
  incoherent beyond a clause.
- Quote tracking is weak and there is no induction behaviour on repeated random tokens: do not
  use it to demonstrate induction heads.
- Its vocabulary is not GPT-2's: token ids and strings differ from `gpt2`.
"""
    open(os.path.join(DEST, "MODEL_CARD.md"), "w").write(card)
    print(card)


if __name__ == "__main__":
    main()
